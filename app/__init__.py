"""The application layer on top of the library: the `dynface` command line, Ray plumbing and reports.

`dynface/` (the method) never imports from here, nor from `flows/`, `tasks/` or `catalogs/`."""
