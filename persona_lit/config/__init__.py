"""Every command-line override checked before Hydra runs, one line per mistake: overrides.py (the command line,
groups, bundles, compose), check.py (keys and values: check_cli), schema.py (what each key accepts)."""
