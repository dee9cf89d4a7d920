"""The `qtune` command line."""
