"""`python evaluate.py task=persistence mechanism=steer ...`: the steer-then-release experiment for several
personas (definitions in persistence.py, options in conf/task/persistence.yaml, outputs in
persistence_report.py).

Each persona gets a freshly loaded base model with its own `steer` mechanism (the mechanism's direction
overridden by task.directions[i]; hooks are never stacked). The control arm (steering disabled) does not
depend on the persona: it runs once, projected on every persona's direction.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from persona_lit.models.backbones import decoder_layers, load_backbone
from persona_lit.build import attach_mechanism, place, plain, resolve_device, resolve_precision
from persona_lit.data.readers import default_mt_bench_path, read_jsonl
from persona_lit.errors import UserError
from persona_lit.steering.persistence import ArmTrace, Decoding, prompt_ids, run_arm, run_seed
from persona_lit.steering.vectors import Direction, load_direction


@dataclass(frozen=True)
class Options:
    directions: list[str]
    n_steer: int
    n_release: int
    questions: int
    questions_path: str | None
    exclude_categories: list[str]
    seeds: list[int]
    decoding: Decoding
    system_prompt: str | None
    continue_text: str
    measure_layer: int | None
    window: int
    batch: int


def _int(task: Any, key: str, low: int) -> int:
    value = task.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"task.{key}={value}: need an integer >= {low}")
    return value


def options(cfg: DictConfig) -> Options:
    """Every task.* option checked before anything loads: one line per mistake."""
    task = cfg.task
    if cfg.mechanism.name != "steer":
        raise UserError(f"mechanism={cfg.mechanism.name}: task=persistence steers with mechanism=steer "
                        f"(set mechanism=steer and mechanism.options.alpha)")
    if cfg.get("ckpt"):
        raise UserError(f"ckpt={cfg.ckpt}: task=persistence runs on a base model (model=...) with mechanism=steer")
    if int(cfg.get("devices") or 1) != 1:
        raise UserError(f"devices={cfg.devices}: task=persistence runs in one process (devices=1; device=cuda "
                        f"for a GPU)")
    if (cfg.mechanism.options.get("history") or "steered") != "steered":
        raise UserError(f"mechanism.options.history={cfg.mechanism.options.history}: task=persistence measures "
                        f"what the steered phase leaves in the KV cache; allowed here: steered")
    directions = list(task.get("directions") or [])
    if not directions:
        if not cfg.mechanism.options.get("direction"):
            raise UserError("task.directions=[]: give direction files (task.directions=[a.safetensors,...]) or "
                            "mechanism.options.direction")
        directions = [str(cfg.mechanism.options.direction)]
    seeds = list(task.get("seeds") or [])
    integers = all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not integers or len(set(seeds)) < len(seeds):
        raise UserError(f"task.seeds={seeds}: need a non-empty list of distinct integers")
    do_sample = task.get("do_sample")
    if not isinstance(do_sample, bool):
        raise UserError(f"task.do_sample={do_sample}: need true or false")
    if not do_sample and len(seeds) > 1:
        raise UserError(f"task.seeds={seeds}: greedy decoding (task.do_sample=false) repeats the same run for every "
                        f"seed; give one seed (task.seeds=[0]) or sample")
    temperature, top_p = task.get("temperature"), task.get("top_p")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise UserError(f"task.temperature={temperature}: need a number > 0")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"task.top_p={top_p}: need a number in (0, 1]")
    measure = task.get("measure_layer")
    if measure is not None and (isinstance(measure, bool) or not isinstance(measure, int)):
        raise UserError(f"task.measure_layer={measure}: need null or a decoder block index")
    text = task.get("continue_text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"task.continue_text={text!r}: need a non-empty string (the user turn after an end of turn)")
    system = task.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise UserError(f"task.system_prompt={system!r}: need null (the model's default), '' (none) or a string")
    path = task.get("questions_path")
    if path is not None and not Path(str(path)).expanduser().is_file():
        raise UserError(f"task.questions_path={path}: file not found (JSONL with 'question' or MT-bench 'turns')")
    return Options(directions, _int(task, "n_steer", 0), _int(task, "n_release", 1), _int(task, "questions", 1),
                   None if path is None else str(Path(str(path)).expanduser()),
                   [str(c) for c in task.get("exclude_categories") or []], seeds,
                   Decoding(do_sample, float(temperature), float(top_p)), system, text, measure,
                   _int(task, "window", 1), _int(task, "batch", 1))


def read_questions(opts: Options) -> list[str]:
    """The first `questions` of the file (its 'question', or an MT-bench record's first turn)."""
    source = Path(opts.questions_path) if opts.questions_path else default_mt_bench_path()
    found: list[str] = []
    for where, record in read_jsonl(source):
        if record.get("category") in opts.exclude_categories:
            continue
        text = record.get("question")
        if text is None and isinstance(record.get("turns"), list) and record["turns"]:
            text = record["turns"][0]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: needs 'question' (a string) or 'turns' (a list of strings) "
                            f"(task.questions_path)")
        found.append(text)
        if len(found) == opts.questions:
            return found
    raise UserError(f"task.questions={opts.questions}: {source} has only {len(found)} questions"
                    f"{' after excluding ' + str(opts.exclude_categories) if opts.exclude_categories else ''}")


def persona_names(directions: list[Direction], paths: list[str]) -> list[str]:
    names = [str(d.meta.get("name") or d.meta.get("persona") or Path(p).stem) for d, p in zip(directions, paths)]
    return [n if names.count(n) == 1 else f"{n}:{Path(p).stem}#{i}" for i, (n, p) in enumerate(zip(names, paths))]


def default_measure_layer(steered: list[int], n_layers: int) -> int:
    """Halfway between the deepest steered block and the last block (the steered block itself when it is
    the last)."""
    deepest = max(steered)
    return (deepest + n_layers) // 2 if deepest < n_layers - 1 else deepest


def _arm(model, chat, opts: Options, runs, prompts, mechanism, layer, units, steered: bool, desc: str) -> ArmTrace:
    """Every run in batches of opts.batch rows, joined."""
    parts = []
    for start in tqdm(range(0, len(runs), opts.batch), desc=desc, unit="batch"):
        chunk = runs[start: start + opts.batch]
        parts.append(run_arm(model, chat, [prompts[q] for q, _ in chunk], [run_seed(q, s) for q, s in chunk],
                             opts.n_steer, opts.n_release, mechanism, layer, units, opts.decoding, steered,
                             opts.continue_text))
    return ArmTrace(torch.cat([p.tokens for p in parts]), torch.cat([p.projection for p in parts]),
                    torch.cat([p.turn_end for p in parts]), [ids for p in parts for ids in p.ids])


def run_task(cfg: DictConfig) -> Path:
    from persona_lit.steering.persistence_report import log_results, summarize, write_outputs

    opts = options(cfg)
    questions = read_questions(opts)  # bad data fails before the model loads
    for i, path in enumerate(opts.directions):  # unreadable files too
        load_direction(path, key=f"task.directions[{i}]")
    device = resolve_device(cfg.get("device"))
    precision, dtype = resolve_precision(cfg.get("precision"), device)
    backbone = load_backbone(cfg.model, device=device)
    n_layers = len(decoder_layers(backbone.model))
    if opts.measure_layer is not None and not 0 <= opts.measure_layer < n_layers:
        raise UserError(f"task.measure_layer={opts.measure_layer}: this model has decoder blocks 0..{n_layers - 1}")
    directions = [load_direction(p, key=f"task.directions[{i}]", fingerprint=backbone.fingerprint, layers=n_layers)
                  for i, p in enumerate(opts.directions)]
    names = persona_names(directions, opts.directions)
    runs = [(q, s) for q in range(len(questions)) for s in opts.seeds]
    prompts = [prompt_ids(backbone.chat, q, opts.system_prompt) for q in questions]
    control, steered, layer, steer_layers = None, [], None, None
    model = mechanism = None
    for i, (name, path) in enumerate(zip(names, opts.directions)):
        if i > 0:  # a fresh base model per persona: one steering mechanism, its hooks never stacked
            model = mechanism = None  # released before the next model loads
            backbone = load_backbone(cfg.model, device=device)
        mech_cfg = OmegaConf.create(plain(cfg.mechanism))
        mech_cfg.options.direction = path
        model, mechanism = attach_mechanism(backbone, mech_cfg)
        model.eval()
        place(model, mechanism, device, dtype)
        if layer is None:
            steer_layers = list(mechanism.layers)
            layer = opts.measure_layer if opts.measure_layer is not None else default_measure_layer(steer_layers,
                                                                                                    n_layers)
            zero = [n for n, d in zip(names, directions) if float(d.vectors[layer].norm()) == 0]
            if zero:
                raise UserError(f"task.measure_layer={layer}: the direction of {zero[0]!r} is zero there; "
                                f"choose another layer")
            units = torch.stack([d.unit(layer) for d in directions])
            control = _arm(model, backbone.chat, opts, runs, prompts, mechanism, layer, units, False, "control")
        steered.append(_arm(model, backbone.chat, opts, runs, prompts, mechanism, layer, units[i: i + 1], True,
                            f"steered {name}"))
    info = {"model": backbone.name, "mechanism": "steer", "alpha": float(cfg.mechanism.options.alpha),
            "steer_layers": steer_layers, "positions": str(cfg.mechanism.options.get("positions") or "all"),
            "cap": cfg.mechanism.options.get("cap"), "measure_layer": layer, "n_steer": opts.n_steer,
            "n_release": opts.n_release, "questions": questions, "seeds": opts.seeds, "runs": len(runs),
            "do_sample": opts.decoding.do_sample, "temperature": opts.decoding.temperature,
            "top_p": opts.decoding.top_p, "window": opts.window, "continue_text": opts.continue_text,
            "system_prompt": opts.system_prompt, "device": str(device), "precision": precision,
            "personas": names, "directions": opts.directions}
    results, arrays = summarize(info, names, directions, runs, control, steered)
    results["config"] = {"model": plain(cfg.model), "mechanism": plain(cfg.mechanism), "task": plain(cfg.task)}
    out_dir = Path(cfg.out_dir)
    command = shlex.join(["python", "evaluate.py", *sys.argv[1:]]) if Path(sys.argv[0]).name == "evaluate.py" else ""
    write_outputs(out_dir, results, arrays, names, runs, control, steered, backbone.chat, command)
    log_results(cfg, results, out_dir)
    print(f"persona_lit: persistence written to {out_dir} (report.md, results.json, persistence.png, "
          f"traces.safetensors, transcript.jsonl)")
    return out_dir
