"""The backbone side of persona_lit: loading models (backbones.py) and chat templates and tokenization (chat.py)."""
