"""Model packs: the manifest (component -> file, sha256, config), loading the networks, writing packs."""
