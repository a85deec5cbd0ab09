"""The backbone side of persona_lit: what wraps or extends transformers' models (kv_cache.py: the runner's cache)."""
