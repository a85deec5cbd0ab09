"""Steer-then-release persistence: how long a persona pushed into the residual stream stays there.

One run = one question and one sampling seed. The conversation is [system prompt as the model's template
has it (task.system_prompt) ; user question], then the model generates N = n_steer + n_release tokens in
ONE KV-cached pass (the history is never re-encoded, never re-tokenised, no <bos> beyond the first):

- forward k (k = 0..N-1) feeds the not-yet-cached tokens (k = 0: the prompt; k > 0: generated token k-1,
  plus a "Continue." user turn when token k-1 was the chat format's end token) and yields the logits of
  generated token k. Forwards k < n_steer run with the steering mechanism on (positions fed there get
  the addition and keep it in the cache), forwards k >= n_steer with `mechanism.disabled()`.
- p_t, the recorded projection of generated token t, is the output of decoder block `measure_layer` at
  the last position fed in forward t (the state from which token t was sampled), dotted with the unit
  persona direction of that layer. The hook runs before any other forward hook on that block, so it reads
  the block's output before a steering hook at that same layer adds its vector; but at a steered position
  every block after a steered layer still carries the added vector in its residual stream, so during the
  steered phase the level includes the addition itself. At release positions nothing is added anywhere:
  what stays is what the model carries forward from the steered cache and the sampled text.
- End of turn: when a row samples the end token (ChatTokenizer.end_id: <|im_end|> for ChatML, Gemma's
  <end_of_turn>), that token counts as generated token t; the next forward feeds it, the format's
  trailer and a user turn `continue_text` ending in the assistant header, and generation goes on.
  Only generated tokens are counted (t runs over them; the inserted turns are not counted).

Centring (per run): the control run is the same question and seed with steering disabled throughout,
q_t its projections. With b = mean_t q_t over all N control tokens (the unsteered level of this run) and
s = mean_{t < n_steer} p_t (the steered level),

    c_t = (p_t - b) / (s - b),         1 = the steered level, 0 = the unsteered level.

A run has no steered level (c = NaN, counted and named in the report) when n_steer = 0, or when its
steered phase equals its control (identical projections at every steered token: alpha = 0 or steering
off), or when s = b. Half-life (per run): with r = t - n_steer the release index (0..n_release-1) and a
forward window of w tokens, HL = min{r : mean(c_{r}, ..., c_{min(r + w, n_release) - 1}) < 0.5} (indices in
release tokens); HL = 0 means the first unsteered token is already below half. A run whose window mean
never falls below 0.5 is censored: HL >= n_release.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from persona_lit.models.backbones import decoder_layers, layer_types
from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.metrics.drift import unit_interval
from persona_lit.steering.vectors import block_output

HALF = 0.5


@dataclass
class ArmTrace:
    tokens: torch.Tensor  # [rows, N] generated ids
    projection: torch.Tensor  # [rows, N, P] float64: p_t on each of the P unit directions given
    turn_end: torch.Tensor  # [rows, N] bool: token t was the end token (a Continue turn followed)
    ids: list[list[int]]  # each row's real ids fed to the model: prompt, generated tokens, Continue turns


@dataclass(frozen=True)
class Decoding:
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95


class Sampler:
    """Greedy, or temperature + nucleus sampling with one generator per row, so a row draws the same
    numbers alone or in any batch, steered or not (the control of a run shares its seed)."""

    def __init__(self, seeds: Sequence[int], decoding: Decoding):
        self.decoding = decoding
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] (CPU) -> token per row."""
        d = self.decoding
        if not d.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.double() / d.temperature, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p[sorted_p.cumsum(-1) - sorted_p > d.top_p] = 0  # nucleus: the smallest set reaching top_p
        picks = [torch.multinomial(sorted_p[b], 1, generator=g) for b, g in enumerate(self.generators)]
        return order.gather(1, torch.stack(picks)).squeeze(1)


def run_seed(question: int, seed: int) -> int:
    """The generator seed of (question index, seed): distinct per run, shared by a run's two arms."""
    return int(seed) * 1_000_003 + int(question)


def prompt_ids(chat, question: str, system: str | None) -> list[int]:
    """[system prompt (None: the model's default, '' none) ; user question] ending in the assistant header."""
    return chat.turn_ids(question, first=True, system=system)


def continue_ids(chat, text: str) -> list[int]:
    """What follows a generated end token: the format's trailer, a user turn `text`, the assistant header."""
    return chat.close_assistant()[1:] + chat.user_turn_ids(text)


@contextlib.contextmanager
def recording(model: torch.nn.Module, layer: int, units: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Appends, per forward, block `layer`'s output at the last position projected on `units` [P, hidden]
    ([rows, P] float64, CPU). Registered first among the block's forward hooks (prepend), so it reads the
    output before a steering hook on the same block changes it."""
    seen: list[torch.Tensor] = []
    cache: dict[Any, torch.Tensor] = {}

    def hook(module, args, output):
        hidden = block_output(output)[:, -1].float()
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            cache[key] = units.to(device=hidden.device, dtype=torch.float32).T
        seen.append((hidden @ cache[key]).double().cpu())

    handle = decoder_layers(model)[layer].register_forward_hook(hook, prepend=True)
    try:
        yield seen
    finally:
        handle.remove()


def _phase(mechanism, on: bool):
    return contextlib.nullcontext() if on or mechanism is None else mechanism.disabled()


def _generated_mask(chunks: Sequence[Sequence[bool]]) -> torch.Tensor:
    """Per fed column, left-padded like Conversation.append: True where a generated token sits."""
    width = max(len(c) for c in chunks)
    return torch.tensor([[False] * (width - len(c)) + list(c) for c in chunks], dtype=torch.bool)


def sliding_window(model: torch.nn.Module) -> int | None:
    """The smallest sliding-attention window of the model (Gemma-3), None when every layer is global."""
    if "sliding_attention" not in layer_types(model):
        return None
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.sliding_window)


@torch.no_grad()
def run_arm(model: torch.nn.Module, chat, prompts: Sequence[Sequence[int]], seeds: Sequence[int], n_steer: int,
            n_release: int, mechanism, measure_layer: int, units: torch.Tensor, decoding: Decoding,
            steered: bool = True, continue_text: str = "Continue.") -> ArmTrace:
    """All rows (prompt, generator seed) as one left-padded batch through the single KV-cached pass (see the
    module docstring). steered=False: the control, every forward inside mechanism.disabled(). A mechanism
    steering only `prompt` or `response` positions gets `assistant_mask` (True on generated tokens).

    Padding between a row's real tokens (the other rows' Continue turns) takes slots of a sliding-attention
    window in transformers' cache, so such a row would see fewer real tokens there than alone: when that can
    have happened (the batch grew past the window), the rows are run again one at a time (exact, slower)."""
    args = (n_steer, n_release, mechanism, measure_layer, units, decoding, steered, continue_text)
    trace, slots, inner = _run_batch(model, chat, prompts, seeds, *args)
    window = sliding_window(model)
    if window is None or len(prompts) == 1 or slots <= window or not inner:
        return trace
    alone = [_run_batch(model, chat, [p], [s], *args)[0] for p, s in zip(prompts, seeds)]
    return ArmTrace(torch.cat([a.tokens for a in alone]), torch.cat([a.projection for a in alone]),
                    torch.cat([a.turn_end for a in alone]), [a.ids[0] for a in alone])


def _run_batch(model, chat, prompts, seeds, n_steer, n_release, mechanism, measure_layer, units, decoding, steered,
               continue_text) -> tuple[ArmTrace, int, bool]:
    """run_arm on one padded batch; also the slot count and whether any row has padding between real tokens."""
    rows, total = len(prompts), n_steer + n_release
    runner = ConversationRunner(model, chat)  # only its forward_new: padding-aware positions and the cache
    conv = Conversation(None, rows)
    conv.append([list(p) for p in prompts], chat.pad_id)
    fed = _generated_mask([[False] * len(p) for p in prompts])
    masked = bool(getattr(mechanism, "uses_assistant_mask", False))
    if mechanism is not None:
        mechanism.begin_conversation(None)
    sampler, after_end = Sampler(seeds, decoding), continue_ids(chat, continue_text)
    tokens = torch.zeros(rows, total, dtype=torch.long)
    with recording(model, measure_layer, units) as seen:
        for k in range(total):
            extra = {"assistant_mask": fed.to(runner.device)} if masked else {}
            with _phase(mechanism, steered and k < n_steer):
                out = runner.forward_new(conv, logits_to_keep=1, **extra)
            tokens[:, k] = sampler.pick(out.logits[:, -1].float().cpu())
            if k + 1 < total:  # the last token is never fed (nothing reads its state)
                chunks = [[t] + (after_end if t == chat.end_id else []) for t in tokens[:, k].tolist()]
                conv.append(chunks, chat.pad_id)
                fed = _generated_mask([[True] + [False] * (len(c) - 1) for c in chunks])
    projection = torch.stack(seen, 1)  # [rows, N, P]
    inner = bool((~conv.mask & (conv.mask.long().cumsum(1) > 0)).any())
    trace = ArmTrace(tokens, projection, tokens == chat.end_id, [conv.row_ids(b) for b in range(rows)])
    return trace, conv.tokens.shape[1], inner


# ---- centring and statistics over runs -----------------------------------------------------------


def centre(steered: torch.Tensor, control: torch.Tensor, n_steer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [runs, N], level s - b [runs]) from p = steered, q = control [runs, N] (module docstring). Runs
    without a steered level get NaN in both."""
    p, q = steered.double(), control.double()
    b = q.mean(1)
    if n_steer == 0:
        nan = torch.full_like(b, math.nan)
        return torch.full_like(p, math.nan), nan
    level = p[:, :n_steer].mean(1) - b
    none = (p[:, :n_steer] == q[:, :n_steer]).all(1) | (level == 0) | ~torch.isfinite(level)
    level = level.masked_fill(none, math.nan)
    return (p - b[:, None]) / level[:, None], level


def half_life(release: torch.Tensor, window: int = 8, threshold: float = HALF) -> tuple[torch.Tensor, torch.Tensor]:
    """(HL [runs] float, censored [runs] bool) from the centred release phase [runs, n_release]: the first
    release index whose forward window mean (w tokens, shorter at the end) is < threshold; n_release and
    censored when there is none; NaN for runs with no steered level."""
    runs, m = release.shape
    zero = torch.zeros(runs, 1, dtype=torch.float64)
    cum = torch.cat([zero, release.double().cumsum(1)], 1)
    starts = torch.arange(m)
    ends = (starts + window).clamp(max=m)
    means = (cum[:, ends] - cum[:, starts]) / (ends - starts).double()
    below = means < threshold
    censored = ~below.any(1)
    first = below.double().argmax(1).double().masked_fill(censored, float(m))
    invalid = torch.isnan(release).any(1) if m else torch.zeros(runs, dtype=torch.bool)
    return first.masked_fill(invalid, math.nan), censored & ~invalid


def curve(centred: torch.Tensor) -> dict[str, list]:
    """Mean centred projection per generated token over runs with a steered level, with a 95% t-interval
    over runs (none for n = 1 or no spread: see metrics.drift.unit_interval)."""
    valid = centred[~torch.isnan(centred).any(1)] if centred.numel() else centred
    out: dict[str, list] = {"token": list(range(centred.shape[1])), "mean": [], "ci_low": [], "ci_high": [],
                            "n": [], "interval": []}
    for column in valid.T.tolist() if valid.shape[0] else [[] for _ in range(centred.shape[1])]:
        stats = unit_interval(column)
        for key in ("mean", "ci_low", "ci_high", "n", "interval"):
            out[key].append(stats[key])
    return out


def median_censored(values: Sequence[float], censored: Sequence[bool]) -> tuple[float, bool]:
    """(median, is_lower_bound): censored values sort above all others; a median that touches one is only
    known to be >= that value."""
    order = sorted(zip(values, censored), key=lambda vc: (vc[1], vc[0]))
    n = len(order)
    if n == 0:
        return math.nan, False
    middle = order[(n - 1) // 2: n // 2 + 1]
    return sum(v for v, _ in middle) / len(middle), any(c for _, c in middle)


def half_life_stats(values: torch.Tensor, censored: torch.Tensor, n_release: int) -> dict[str, Any]:
    """Over runs with a steered level: the median (a lower bound when it touches a censored run), the mean
    with a 95% interval when no run is censored (with censoring the mean is only a lower bound: no
    interval is given), and the counts. The interval is unit_interval's with bounds [0, n_release]: a
    t-interval clipped to them, or, when every run has the same half-life, the Wilson interval rescaled."""
    keep = ~torch.isnan(values)
    v, c = values[keep].tolist(), censored[keep].tolist()
    median, median_lower = median_censored(v, c)
    stats = unit_interval(v, (0.0, float(n_release)))
    out = {"n": len(v), "censored": int(sum(c)), "n_release": n_release, "median": median,
           "median_lower_bound": median_lower, "mean": stats["mean"], "mean_lower_bound": any(c),
           "ci_low": stats["ci_low"], "ci_high": stats["ci_high"], "interval": stats["interval"],
           "no_steered_level": int((~keep).sum())}
    if any(c):
        out.update(ci_low=None, ci_high=None, interval="none (censored runs)")
    return out


def release_mean_stats(centred: torch.Tensor, n_steer: int) -> dict[str, Any]:
    """Per run the mean centred projection over the release phase (an area under the curve: no censoring),
    then mean and 95% t-interval over runs."""
    per_run = centred[:, n_steer:].mean(1)
    values = per_run[~torch.isnan(per_run)].tolist()
    return {**unit_interval(values), "per_run": per_run.tolist()}


def format_half_life(s: dict[str, Any]) -> str:
    """'median 12 tokens (mean 14.2, 95% CI 9.1 to 19.3; n=8 runs)', >= for lower bounds; for the report
    (takes half_life_stats' dict, also read back from JSON with None for NaN)."""
    if not s["n"]:
        return "no run with a steered level"
    med = f"{'>= ' if s['median_lower_bound'] else ''}{s['median']:g}"
    mean = f"{'>= ' if s['mean_lower_bound'] else ''}{s['mean']:.1f}"
    why = "n=1" if s["n"] == 1 else "censored runs" if s["censored"] else "all runs equal"
    ci = f", 95% CI {s['ci_low']:.1f} to {s['ci_high']:.1f}" if s["ci_low"] is not None else f", no interval: {why}"
    cens = f", {s['censored']} of {s['n']} censored at >= {s['n_release']}" if s["censored"] else ""
    return f"median {med} tokens (mean {mean}{ci}; n={s['n']} runs{cens})"
