"""The backbone side of persona_lit: loading models (backbones.py), chat templates and tokenization (chat.py), and
the conversation runner's in-place KV cache (kv_cache.py)."""
