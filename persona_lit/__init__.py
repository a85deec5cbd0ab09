"""persona_lit: persona drift in chat language models, measured and fixed with swappable memory mechanisms."""

from persona_lit.versions import check as _check_versions

# One line (UntestedVersionError, an ImportError) if transformers/Lightning is outside the range CI tests.
_check_versions()

# bitsandbytes' CPU backend, on import (peft imports it), asks for the `kernels` package, which would fetch a kernel
# from the model hub at import time: we never want that, so its one-line advice is noise on every command.
__import__("logging").getLogger("bitsandbytes.backends.cpu.ops").setLevel(40)  # ERROR
