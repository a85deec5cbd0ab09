"""persona_lit: persona drift in chat language models, measured and fixed with swappable memory mechanisms."""
