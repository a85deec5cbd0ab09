"""A direction as a llama.cpp control vector (GGUF), so the same persona can be steered in llama.cpp.

llama.cpp's conventions, read from its source (common/common.cpp `common_control_vector_load_one`,
src/llama-adapter.cpp `llama_adapter_cvec`, src/models/llama.cpp):

- a tensor `direction.N` (float32, 1-D, n_embd) is added to the output of decoder block N (0-based), after
  the block's residual add (`build_cvec(cur, il)` then `l_out`): the same index as ours (L = output of block
  L = hidden_states[L + 1]), no offset. The loader rejects N = 0 (there is no slot for block 0), so block 0
  is never exported;
- operation: add, at every position (prompt and generated tokens), for the blocks in
  `--control-vector-layer-range START END` (default: all);
- `--control-vector-scaled FILE:SCALE` (older builds: `FILE SCALE`) multiplies every tensor by SCALE when
  it loads (several files are summed); `--control-vector FILE` means SCALE 1.

What we write: direction.L = unit(direction[L]) x activation_norm[L] for L >= 1, so SCALE is our alpha
(mechanism=steer's h += alpha * activation_norm[L] * unit direction). With `--control-vector-layer-range L L`
llama.cpp steers block L alone, as mechanism=steer at layer L does. The same facts are written into the
file as `persona_lit.*` strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from persona_lit.errors import UserError
from persona_lit.outputs import staged_file
from persona_lit.steering.vectors import CONVENTION, Direction

ARCH = "controlvector"
NOTES = {
    "persona_lit.layer_convention": CONVENTION + "; tensor direction.N is added to the output of decoder block N "
    "(llama.cpp build_cvec after block N), the same index; block 0 cannot be exported (llama.cpp rejects direction.0)",
    "persona_lit.operation": "add, at every position, after the block's residual add (not at the block's write)",
    "persona_lit.scale": "direction.N = unit direction[N] x activation_norm[N] (mean |h| at block N without the "
    "persona): --control-vector-scaled FILE:ALPHA adds ALPHA x activation_norm[N] x unit direction, i.e. "
    "persona_lit's alpha",
    "persona_lit.usage": "add --control-vector-layer-range L L to steer block L alone, like mechanism=steer at L",
}


def model_hint(direction: Direction) -> str:
    """llama.cpp's architecture name for the model the direction came from (gemma3_text -> gemma3)."""
    arch = str(direction.meta.get("architecture") or direction.meta.get("model") or "unknown")
    return arch.removesuffix("_text")


def control_vectors(direction: Direction, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """{L: unit(direction[L]) x activation_norm[L]} as float32, for `layers` (default: 1..last)."""
    chosen = list(range(1, direction.layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if not 1 <= x < direction.layers]
    if bad or not chosen:
        raise UserError(f"gguf layers {chosen}: allowed 1..{direction.layers - 1} (llama.cpp has no slot for "
                        f"block 0; this direction has {direction.layers} layers)")
    return {x: (direction.unit(x) * direction.activation_norm[x]).numpy().astype(np.float32) for x in chosen}


def export_gguf(direction: Direction, path: str | Path, layers: Sequence[int] | None = None) -> Path:
    """Writes the control vector atomically (temporary file + rename); returns its path."""
    import gguf

    path = Path(path)
    vectors = control_vectors(direction, layers)
    with staged_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint(direction))
        writer.add_uint32(f"{ARCH}.layer_count", len(vectors))
        for key, text in NOTES.items():
            writer.add_string(key, text)
        for key in ("model", "fingerprint", "source", "token_role", "samples"):
            if direction.meta.get(key) is not None:
                writer.add_string(f"persona_lit.{key}", str(direction.meta[key]))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | Path) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """({L: vector}, {key: value}) of a control-vector GGUF (strings and numbers only)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        fields[name] = field.contents()
    tensors = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise UserError(f"{path}: tensor {t.name!r} is not direction.<layer>")
        tensors[int(index)] = np.array(t.data, dtype=np.float32).reshape(-1)
    return tensors, fields
