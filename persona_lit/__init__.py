"""persona_lit: persona drift in chat language models, measured and fixed with swappable memory mechanisms."""

from persona_lit.versions import check as _check_versions

# One line (UntestedVersionError, an ImportError) if transformers/Lightning is outside the range CI tests.
_check_versions()
