"""Prefect flows: `restore_archive` (the product)."""
