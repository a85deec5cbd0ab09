"""Personas and where they come from, one module each; import from the module that defines a name.

- types.py: Persona, Probe, Check (what a persona is)
- checks.py: the adherence checks (CHECKS) and what their arguments must be
- load.py: reading a persona (built-in pack/, a YAML file, a Li et al. 2024 record) and writing it back
- li2024.py, li2024_checks.py, li2024_helpers.py: the Li et al. 2024 prompts and their interpreted checks
- pool.py: the persona pool from every source in ../shared/data; split.py: its persona-disjoint split
"""
