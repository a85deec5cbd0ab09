"""Persona directions: extraction, cosine similarity between them, and task=direction of evaluate.py.

Per layer L (the output of decoder block L, read by a hook on the block: `hidden_states[L + 1]` in
transformers' tuple, except the last block, whose entry there is the final-norm output):

    direction[L]       = mean over samples with the persona of m_s[L]  -  the same over samples without it
    activation_norm[L] = mean over samples without the persona of (mean ||h_t[L]|| over the sample's tokens)

where m_s[L] is sample s's mean activation over its tokens: the answer tokens the model generated itself
(token_role=response, greedy, the end-of-turn token excluded), or the last token of the generation prompt,
the position that predicts the first answer token (token_role=reply_start: nothing is generated). Each
sample weighs the same whatever its length; a sample with no answer token is left out (counted as skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from persona_lit.models.backbones import Backbone, decoder_layers, input_device, layer_types, load_backbone
from persona_lit.models.chat import ChatTokenizer
from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.errors import UserError
from persona_lit.steering.sources import Source, parse_sources
from persona_lit.steering.vectors import Direction, block_hooks, load_direction

TOKEN_ROLES = ("response", "reply_start")


@dataclass
class Sample:
    prompt: list[int]  # persona segment + user turn + generation prompt
    answer: list[int]  # the answer's tokens, no end-of-turn token ([] for reply_start)


def prompt_ids(chat: ChatTokenizer, system: str | None, question: str) -> list[int]:
    """The ids a one-question conversation starts with (None: the model's default system prompt)."""
    return chat.turn_ids(question, first=True, system=system)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate(model: torch.nn.Module, chat: ChatTokenizer, pairs: Sequence[tuple[str | None, str]],
             max_new_tokens: int, batch: int, progress: str | None = None) -> list[Sample]:
    """Greedy answers, `batch` rows at a time (rows of one batch share their system prompt), through the
    conversation runner; the answer ids are the ids generated, never re-tokenised text. Where a sliding-window
    layer could see a row's left padding (transformers counts padded slots in the window), only prompts of
    equal length share a batch, so every row is generated exactly as alone. `progress`: a bar of that name over
    the answers."""
    from tqdm.auto import tqdm

    runner = ConversationRunner(model, chat, None, max_new_tokens)
    close = chat.close_assistant()
    prompts = [prompt_ids(chat, system, q) for system, q in pairs]
    window = _sliding_window(model)
    exact = window is not None and max(map(len, prompts)) + max_new_tokens > window
    out: list[Sample | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(pairs)), key=lambda i: len(prompts[i])):  # similar lengths: little padding
        groups.setdefault((pairs[i][0], len(prompts[i]) if exact else 0), []).append(i)
    bar = tqdm(total=len(pairs), desc=progress, unit="answer", disable=progress is None, mininterval=2.0)
    for (system, _), indices in groups.items():
        for chunk in _chunks(indices, batch):
            conv = Conversation(system, len(chunk))
            runner.say(conv, [pairs[i][1] for i in chunk])
            for b, i in enumerate(chunk):
                row, prompt = conv.row_ids(b), prompts[i]
                assert row[: len(prompt)] == prompt and row[-len(close) :] == close, "runner ids out of step"
                out[i] = Sample(prompt, row[len(prompt) : len(row) - len(close)])
            bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The smallest sliding-attention window of the model's decoder layers, or None (all global)."""
    config = getattr(model.config, "text_config", None) or model.config
    if "sliding_attention" not in layer_types(model) or not getattr(config, "sliding_window", None):
        return None
    return int(config.sliding_window)


def token_positions(sample: Sample, token_role: str) -> list[int]:
    """The positions averaged for one sample, in its unpadded ids prompt + answer."""
    if token_role == "reply_start":
        return [len(sample.prompt) - 1]
    return list(range(len(sample.prompt), len(sample.prompt) + len(sample.answer)))


@torch.no_grad()
def sample_means(model: torch.nn.Module, samples: Sequence[Sample], token_role: str, pad_id: int,
                 batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means [samples, layers, hidden], mean norms [samples, layers], tokens [samples]) of each sample's
    block outputs over its token_positions: one forward per `batch` rows, padded on the right (so every
    real token is computed exactly as alone). A sample with no position gets NaN rows."""
    n_layers, device = len(decoder_layers(model)), input_device(model)
    means, norms, counts = [], [], []
    for chunk in _chunks(list(samples), batch):
        ids = [s.prompt + (s.answer if token_role == "response" else []) for s in chunk]
        width = max(len(x) for x in ids)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        select = torch.zeros(len(chunk), width, dtype=torch.bool)
        for b, (x, s) in enumerate(zip(ids, chunk)):
            tokens[b, : len(x)], attention[b, : len(x)] = torch.tensor(x), 1
            select[b, token_positions(s, token_role)] = True
        sel = select.to(device)
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def grab(layer: int):
            def fn(hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
                h = hidden.float()
                sums[layer] = ((h * sel[..., None]).sum(1).double().cpu(), (h.norm(dim=-1) * sel).sum(1).double().cpu())
            return fn

        with block_hooks(model, {layer: grab(layer) for layer in range(n_layers)}):
            model(input_ids=tokens.to(device), attention_mask=attention.to(device), use_cache=False, logits_to_keep=1)
        count = select.sum(1).double()
        means.append(torch.stack([sums[k][0] for k in range(n_layers)], 1) / count[:, None, None])
        norms.append(torch.stack([sums[k][1] for k in range(n_layers)], 1) / count[:, None])
        counts.append(select.sum(1))
    return torch.cat(means), torch.cat(norms), torch.cat(counts)


def extract(backbone: Backbone, source: Source, token_role: str = "response", max_new_tokens: int = 48,
            batch: int = 8) -> Direction:
    """The direction of one source (see the module docstring), with its metadata."""
    if token_role not in TOKEN_ROLES:
        raise UserError(f"task.token_role={token_role!r}: allowed: {', '.join(TOKEN_ROLES)}")
    model, chat = backbone.model, backbone.chat
    stats = {}
    for side, pairs in (("pos", source.pos), ("neg", source.neg)):
        if token_role == "response":
            samples = generate(model, chat, pairs, max_new_tokens, batch)
        else:
            samples = [Sample(prompt_ids(chat, system, q), []) for system, q in pairs]
        means, norms, counts = sample_means(model, samples, token_role, chat.pad_id, batch)
        kept = counts > 0
        if not kept.any():
            raise UserError(f"task.sources: {source.spec}: every {side} answer was empty (the model ended at once); "
                            f"nothing to average (try more questions or another token_role)")
        stats[side] = (means[kept].mean(0), norms[kept].mean(0), int(counts.sum()), int((~kept).sum()))
    vectors = (stats["pos"][0] - stats["neg"][0]).float()
    config = backbone.model.config
    meta = {"model": backbone.name, "fingerprint": backbone.fingerprint,
            "architecture": str(getattr(getattr(config, "text_config", None) or config, "model_type", "")),
            "token_role": token_role, "source": source.spec, "kind": source.kind, "name": source.name,
            "samples": len(source.pos), "tokens_pos": stats["pos"][2], "tokens_neg": stats["neg"][2],
            "skipped_pos": stats["pos"][3], "skipped_neg": stats["neg"][3],
            "questions": len({q for _, q in source.pos}), "instructions": source.instructions(),
            "averaging": "mean over samples of each sample's mean over its tokens",
            "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch": batch}
            if token_role == "response" else None}
    return Direction(vectors, stats["neg"][1].float(), meta)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[n, n] cosine similarities of n vectors [n, hidden] (a zero vector gives NaN)."""
    unit = vectors.double() / vectors.double().norm(dim=-1, keepdim=True)
    return unit @ unit.T


def summarize(directions: dict[str, Direction], layer: int, all_layers: bool = True) -> dict[str, Any]:
    """What directions.json holds: per source its counts and per-layer norms; the cosine matrix at `layer`
    (and at every layer with `all_layers`) when there are at least two sources."""
    sources = {}
    for slug, d in directions.items():
        norm = d.vectors.norm(dim=-1)
        relative = norm / d.activation_norm
        sources[slug] = {**{k: d.meta[k] for k in ("source", "kind", "name", "samples", "tokens_pos", "tokens_neg",
                                                    "skipped_pos", "skipped_neg")},
                         "direction_norm": [round(float(x), 5) for x in norm],
                         "activation_norm": [round(float(x), 5) for x in d.activation_norm],
                         "relative_norm": [round(float(x), 5) for x in relative],
                         "peak_layer": int(relative.argmax())}
    out: dict[str, Any] = {"sources": sources}
    if len(directions) >= 2:
        slugs = list(directions)
        stack = torch.stack([directions[s].vectors for s in slugs])  # [n, layers, hidden]
        out["cosine"] = {"layer": layer, "sources": slugs,
                         "matrix": cosine_matrix(stack[:, layer]).round(decimals=4).tolist()}
        if all_layers:
            out["cosine"]["by_layer"] = [cosine_matrix(stack[:, k]).round(decimals=4).tolist()
                                         for k in range(stack.shape[1])]
    return out


def projection_axis(path: Any, fingerprint: str, layers: int, layer: int | None) -> Direction | None:
    """The direction file of `projection_direction` (evaluate.py), checked against the model, or None.
    The drift protocol's reply states at index L are hidden_states[L + 1]: the last index there is the
    final-norm output, not the block output the file measured, so the last layer is refused."""
    if path is None or str(path) in ("", "None", "null"):
        return None
    direction = load_direction(path, "projection_direction", fingerprint=fingerprint, layers=layers)
    at = layers // 2 if layer is None else int(layer)
    if not 0 <= at < layers - 1:
        raise UserError(f"projection_layer={layer}: with projection_direction allowed 0..{layers - 2} (the last "
                        f"reply state is the final-norm output, not block {layers - 1}'s output the file holds)")
    return direction


def _positive_int(cfg: Any, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"task.{key}={value!r}: must be an integer >= 1")
    return value


def run_task(cfg: Any) -> Path:
    """evaluate.py task=direction: one direction file per source in out_dir, plus directions.json, the
    plots and report.md (see conf/task/direction.yaml)."""
    from persona_lit.build import is_quantized, resolve_device, resolve_precision
    from persona_lit.outputs import staged_dir

    t, out_dir = cfg.task, Path(cfg.out_dir)
    token_role = str(t.token_role)
    if token_role not in TOKEN_ROLES:
        raise UserError(f"task.token_role={token_role!r}: allowed: {', '.join(TOKEN_ROLES)}")
    max_new_tokens, batch = _positive_int(t, "max_new_tokens"), _positive_int(t, "batch")
    if cfg.get("ckpt"):
        raise UserError(f"ckpt={cfg.ckpt}: task=direction reads a base model (model=...); drop ckpt")
    sources = parse_sources(t.sources, str(t.assistant_axis_dir), str(t.get("model_name") or cfg.model.name),
                            t.instructions, t.questions)
    device = resolve_device(cfg.get("device"))
    precision, dtype = resolve_precision(cfg.get("precision"), device)
    backbone = load_backbone(cfg.model, device=device)
    if not is_quantized(backbone.model):
        backbone.model.to(device=device, dtype=dtype)
    layers = len(decoder_layers(backbone.model))
    layer = layers // 2 if t.get("layer") is None else t.layer
    if not isinstance(layer, int) or not 0 <= layer < layers:
        raise UserError(f"task.layer={layer!r}: this model has decoder blocks 0..{layers - 1}")
    directions = {}
    for s in sources:
        print(f"persona_lit: {s.spec}: {len(s.pos)} pairs ({token_role}) ...", flush=True)
        directions[s.slug] = extract(backbone, s, token_role, max_new_tokens, batch)
    summary = summarize(directions, layer, bool(t.get("cosine_all_layers", True)))
    summary["run"] = {"model": backbone.name, "fingerprint": backbone.fingerprint, "layers": layers, "layer": layer,
                      "token_role": token_role, "device": str(device), "precision": precision,
                      "max_new_tokens": max_new_tokens, "instructions": t.instructions, "questions": t.questions}
    with staged_dir(out_dir) as tmp:
        write_outputs(tmp, directions, summary, bool(t.get("export_gguf", True)))
    print_summary(summary, out_dir)
    return out_dir


def write_outputs(out: Path, directions: dict[str, Direction], summary: dict[str, Any], gguf: bool = True) -> None:
    """<slug>.safetensors (and <slug>.gguf) per source, directions.json, norms.png, cosine.png (two sources
    or more) and report.md, into `out` (a staged directory)."""
    from persona_lit.steering.gguf_export import export_gguf

    for slug, d in directions.items():
        d.save(out / f"{slug}.safetensors")
        summary["sources"][slug]["file"] = f"{slug}.safetensors"
        if gguf:
            export_gguf(d, out / f"{slug}.gguf")
            summary["sources"][slug]["gguf"] = f"{slug}.gguf"
    (out / "directions.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    _plots(out, summary)
    (out / "report.md").write_text(_report(summary), encoding="utf-8")


def _plots(out: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for slug, s in summary["sources"].items():
        ax.plot(range(len(s["relative_norm"])), s["relative_norm"], marker="o", ms=3, label=slug)
    ax.set_xlabel("layer L (output of decoder block L)")
    ax.set_ylabel("|direction| / mean |h| without persona")
    ax.set_title(f"persona directions, {summary['run']['model']} ({summary['run']['token_role']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "norms.png", dpi=120)
    plt.close(fig)
    if "cosine" not in summary:
        return
    c = summary["cosine"]
    n = len(c["sources"])
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * n, 1.6 + 1.0 * n))
    image = ax.imshow(c["matrix"], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), c["sources"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), c["sources"], fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{c['matrix'][i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"cosine similarity at layer {c['layer']}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "cosine.png", dpi=120)
    plt.close(fig)


def _report(summary: dict[str, Any]) -> str:
    run = summary["run"]
    layer = run["layer"]
    gen = (f"greedy answers of at most {run['max_new_tokens']} tokens, averaged over their tokens"
           if run["token_role"] == "response" else "the last token of the generation prompt (nothing generated)")
    lines = [f"# Persona directions: {run['model']}", "",
             f"Model `{run['model']}` (fingerprint `{run['fingerprint']}`, {run['layers']} decoder blocks); token role "
             f"`{run['token_role']}`: {gen}.", "",
             "Layer index L = the output of decoder block L (the residual stream after it) = `hidden_states[L + 1]` "
             "(for the last block, the block's own output, before the final norm). direction[L] = mean activation "
             "with the persona minus without; |d|/|h| = its length over the mean activation norm without the persona.",
             "", f"| source | pairs | tokens with / without | skipped | \\|d\\|/\\|h\\| at layer {layer} | peak layer |",
             "|---|---|---|---|---|---|"]
    for slug, s in summary["sources"].items():
        lines.append(f"| {slug} (`{s['source']}`) | {s['samples']} | {s['tokens_pos']} / {s['tokens_neg']} | "
                     f"{s['skipped_pos']} / {s['skipped_neg']} | {s['relative_norm'][layer]:.3f} | "
                     f"{s['peak_layer']} ({s['relative_norm'][s['peak_layer']]:.3f}) |")
    lines += ["", "![norms](norms.png)", ""]
    if "cosine" in summary:
        c = summary["cosine"]
        lines += [f"## Cosine similarity at layer {c['layer']}", "", "| | " + " | ".join(c["sources"]) + " |",
                  "|---" * (len(c["sources"]) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for a, row in zip(c["sources"], c["matrix"])]
        lines += ["", "![cosine](cosine.png)", ""]
    first = next(iter(summary["sources"]))
    lines += ["## Using the files", "",
              f"- Drift protocol on this axis: `python evaluate.py ... projection_direction=OUT/{first}.safetensors`.",
              f"- llama.cpp (when `{first}.gguf` was written): `--control-vector-scaled {first}.gguf:ALPHA "
              "--control-vector-layer-range L L` (older builds: `--control-vector-scaled FILE ALPHA`) adds "
              "ALPHA x activation_norm[L] x the unit direction to block L's output at every position, as "
              "`mechanism=steer` with alpha=ALPHA at layer L. Block 0 is not in the file (llama.cpp has no slot "
              "for it); without a layer range every block 1.. is steered at once.", ""]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    """The figures on stdout: relative norm per layer of every source, and the cosine matrix."""
    print(f"persona_lit: directions written to {out_dir} (report.md, directions.json, *.safetensors, *.png"
          f"{', *.gguf' if any('gguf' in s for s in summary['sources'].values()) else ''})")
    for slug, s in summary["sources"].items():
        norms = " ".join(f"{x:.2f}" for x in s["relative_norm"])
        print(f"  {slug}: {s['samples']} pairs, tokens {s['tokens_pos']}/{s['tokens_neg']}, "
              f"|d|/|h| by layer 0..{len(s['relative_norm']) - 1}: {norms} (peak {s['peak_layer']})")
    if "cosine" in summary:
        c = summary["cosine"]
        print(f"  cosine at layer {c['layer']}:")
        for a, row in zip(c["sources"], c["matrix"]):
            print(f"    {a:>28} " + " ".join(f"{x:6.3f}" for x in row))
