"""What evaluate.py runs: restore a checkpoint (or a base model), hold conversations, probe, report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from persona_lit.models.backbones import decoder_layers, load_backbone
from persona_lit.build import (attach_mechanism, place, plain, require_writable, resolve_device, resolve_persona,
                               resolve_precision, restore)
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.evaluation.memory import longest_history, plan_batch
from persona_lit.evaluation.protocol import merge, run_personas, summarize
from persona_lit.data.mt_bench import MTBenchDataModule, neutral_exchanges, references_fingerprint
from persona_lit.errors import UserError
from persona_lit.evaluation.distributed import launch, resolve_placement
from persona_lit.evaluation.judge import Judge, check_judge, judge_arm
from persona_lit.training.loggers import make_logger, training_run_of
from persona_lit.outputs import staged_dir
from persona_lit.evaluation.compare import compare_runs
from persona_lit.evaluation.report import write_report
from persona_lit.steering.directions import projection_axis


def _load(cfg: DictConfig, device: torch.device):
    """The model and its mechanism, on the CPU as loaded (a quantized one already on `device`)."""
    if cfg.ckpt:
        backbone, model, mechanism, persona, config = restore(str(cfg.ckpt), device=device)
        if cfg.persona:
            persona = resolve_persona(cfg.persona)
        return backbone, model, mechanism, persona, config
    backbone = load_backbone(cfg.model, device=device)
    model, mechanism = attach_mechanism(backbone, cfg.mechanism)
    persona = resolve_persona(cfg.persona or "pirate_mentor")
    return backbone, model.eval(), mechanism, persona, {"model": plain(cfg.model), "mechanism": plain(cfg.mechanism)}


def _with_probe_kinds(persona, kinds):
    if not kinds:
        return persona
    kept = tuple(p for p in persona.probes if p.kind in set(kinds))
    if not kept:
        have = sorted({p.kind for p in persona.probes})
        raise UserError(f"probe_kinds={list(kinds)}: persona {persona.name!r} has probes of kinds {have}")
    return dataclasses.replace(persona, probes=kept)


def evaluate(cfg: DictConfig) -> Path | None:
    """Writes the evaluation to cfg.out_dir and returns it (None on the ranks > 0 of devices > 1)."""
    out_dir = Path(cfg.out_dir)
    require_writable(out_dir, "out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"out_dir={out_dir}: exists and is not empty (choose another out_dir)")
    if cfg.compare:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            written = compare_runs([Path(d) for d in cfg.compare], out_dir)
        except UserError:
            out_dir.rmdir()
            raise
        print(f"persona_lit: comparison written to {out_dir} ({', '.join(written)})")
        return out_dir
    if cfg.task.name != "drift":  # another task of conf/task/: its own function does the whole job
        from hydra.utils import get_method

        return get_method(cfg.task._target_)(cfg)
    turns, judge, chosen = drift_inputs(cfg)
    devices, accelerator, device = drift_placement(cfg)
    shards = launch(devices, accelerator) if devices > 1 else None  # every check above runs on every rank
    try:
        return _run(cfg, out_dir, turns, judge, chosen, shards.device if shards else device, shards)
    finally:
        if shards is not None:
            shards.close()


def drift_inputs(cfg: DictConfig) -> tuple[MTBenchDataModule, Judge | None, list | None]:
    """The drift protocol's turns (from the evaluated part of the question split), judge and chosen personas,
    checked before any model loads."""
    from persona_lit.data.question_split import for_evaluation

    split, info = for_evaluation(cfg)
    turns = MTBenchDataModule(cfg.mt_bench_path, int(cfg.turns), int(cfg.conversations), cfg.seed,
                              list(cfg.exclude_categories), question_ids=split.ids(info["part"]))
    turns.setup("predict")  # bad data fails here, before the model loads
    turns.split_info = info
    if cfg.judge.url and not cfg.judge.model:
        raise UserError(f"judge.url={cfg.judge.url}: also set judge.model (the endpoint's model name)")
    for key in ("capability_exchanges", "capability_tokens", "probe_batch", "conversation_batch"):
        if cfg[key] is None and key == "conversation_batch":  # null: chosen from the memory estimate
            continue
        if int(cfg[key]) < (0 if key == "capability_exchanges" else 1):
            raise UserError(f"{key}={cfg[key]}: must be >= {0 if key == 'capability_exchanges' else 1}")
    judge = None
    if cfg.judge.url:
        judge = Judge(str(cfg.judge.url), str(cfg.judge.model), cfg.judge.api_key_env, float(cfg.judge.timeout_s))
        check_judge(judge)
    from persona_lit.personas.split import evaluation_personas

    chosen = evaluation_personas(cfg)  # personas=test_split (val_split, train_split): from the persona pool
    if chosen is None:
        chosen = [resolve_persona(str(n)) for n in cfg.personas] if cfg.personas else None  # bad names fail early
    keys = [p.key for p in chosen or []]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise UserError(f"personas: {twice!r} is given twice; allowed: each persona once (its results are kept "
                        f"under its key)")
    return turns, judge, chosen


def drift_placement(cfg: DictConfig) -> tuple[int, str | None, torch.device]:
    """(devices, accelerator, device) from the device keys; a bad precision fails here too."""
    devices, accelerator = resolve_placement(cfg.device, cfg.devices, cfg.accelerator)
    one = devices == 1 and accelerator is not None  # accelerator=cpu|cuda alone picks the device
    device = resolve_device(accelerator if one else cfg.device, "accelerator" if one else "device")
    resolve_precision(cfg.precision, device)  # a bad value fails here, before any process starts
    return devices, accelerator, device


@dataclasses.dataclass
class DriftSetup:
    backbone: Any
    mechanism: Any
    personas: list
    runner: ConversationRunner
    capability: list
    probe_turns: list[int]
    precision: str
    config: dict[str, Any]
    axis: Any


def drift_setup(cfg: DictConfig, turns: MTBenchDataModule, chosen, device: torch.device) -> DriftSetup:
    """Load and place the model and its mechanism; the personas, capability exchanges and the runner."""
    probe_turns = sorted({int(t) for t in cfg.probe_turns if int(t) <= int(cfg.turns)})
    beyond = sorted({int(t) for t in cfg.probe_turns if int(t) > int(cfg.turns)})
    if beyond:  # the default list reaches further than most runs
        print(f"persona_lit: probe turns {', '.join(map(str, beyond))} lie beyond turns={int(cfg.turns)}: not "
              f"probed", flush=True)
    precision, dtype = resolve_precision(cfg.precision, device)
    backbone, model, mechanism, persona, config = _load(cfg, device)
    axis = projection_axis(cfg.get("projection_direction"), backbone.fingerprint, len(decoder_layers(model)),
                           cfg.projection_layer)  # a saved direction to project on, checked against the model
    precision = place(model, mechanism, device, dtype)
    from persona_lit.evaluation.choice import with_choice_probes

    personas = with_choice_probes(chosen or [persona], int(cfg.get("choice_distractors") or 0), cfg.seed)
    personas = [_with_probe_kinds(p, cfg.probe_kinds) for p in personas]
    torch.manual_seed(int(cfg.seed or 0))
    asked = {t.question_id for streams in turns.persona_streams([p.key for p in personas]).values()
             for stream in streams for t in stream}
    capability = neutral_exchanges(int(cfg.capability_exchanges), asked, cfg.mt_bench_path,
                                   only=turns.question_ids)  # references of the evaluated part only
    runner = ConversationRunner(model, backbone.chat, mechanism, int(cfg.max_new_tokens),
                                int(cfg.probe_max_new_tokens), bool(cfg.do_sample), float(cfg.temperature),
                                probe_batch=int(cfg.probe_batch))
    return DriftSetup(backbone, mechanism, personas, runner, capability, probe_turns, precision, config, axis)


def conversation_batch(cfg: DictConfig, setup: DriftSetup, streams, device: torch.device) -> int:
    """cfg.conversation_batch, checked against the KV cache's estimated size, or (null) the most rows that fit
    (evaluation/memory.py); prints the plan in one line."""
    model = setup.runner.model
    every = [s for group in streams.values() for s in group] if isinstance(streams, dict) else [
        s for _ in setup.personas for s in streams]  # a persona's own streams, or the same streams for every persona
    history = longest_history(setup.backbone.chat, setup.personas + [None], every, int(cfg.max_new_tokens))
    limit = setup.runner.context_limit()
    plan = plan_batch(cfg.conversation_batch, len(every), model,
                      model.get_input_embeddings().weight.dtype, min(history, limit) if limit else history,
                      int(cfg.probe_batch), device)
    print(f"persona_lit: {plan.line()}", flush=True)
    return plan.rows


def _run(cfg: DictConfig, out_dir: Path, turns: MTBenchDataModule, judge: Judge | None, chosen, device, shards):
    """Load, place, run the protocol (on this rank's share of the conversations), report (on rank 0)."""
    main = shards is None or shards.is_main
    commit = source_commit()  # the code that runs: taken now, not when the (long) run ends
    setup = drift_setup(cfg, turns, chosen, device)
    backbone, mechanism, personas, runner = setup.backbone, setup.mechanism, setup.personas, setup.runner
    capability, probe_turns, precision, config, axis = (setup.capability, setup.probe_turns, setup.precision,
                                                        setup.config, setup.axis)
    ks = list(range(turns.conversations))
    streams = turns.persona_streams([p.key for p in personas], shards.share(ks) if shards else ks)
    results = run_personas(runner, personas, streams, probe_turns, control=bool(cfg.control),
                           baseline=bool(cfg.baseline), bleed=bool(cfg.get("bleed", False)), capability=capability,
                           protocol=str(cfg.get("protocol") or "free"),
                           capability_tokens=int(cfg.capability_tokens),
                           batch=conversation_batch(cfg, setup, streams, device), progress=main)  # conversations of several personas share a batch
    by_persona = {persona.key: result for persona, result in zip(personas, results)}
    if shards is not None:  # every rank's conversations, in their original order, on rank 0
        gathered = shards.gather(list(by_persona.values()), len(ks))
        shards.close()  # done with the other ranks: nothing below (torchmetrics' compute) may sync with them
        if not main:
            return None
        by_persona = dict(zip(by_persona, gathered))
    for persona in personas:
        if judge is not None:
            result = by_persona[persona.key]
            for arm in (result.persona_arm, result.baseline_arm, result.control_arm, result.bleed_arm):
                judge_arm(judge, persona.system_prompt, arm)
    cut_at = cut_to_common_turn(by_persona)  # no later turn pools a different mix of conversations
    protocol = merge(list(by_persona.values()))
    last_turn = {key: {arm: [records[-1].turn for records in getattr(r, f"{arm}_arm")]
                       for arm in ("persona", "baseline", "control", "bleed") if getattr(r, f"{arm}_arm")}
                 for key, r in by_persona.items()}  # < turns where the context limit stopped a conversation
    stopped = sorted({records[-1].stopped for r in by_persona.values() for arm in (r.persona_arm, r.baseline_arm,
                      r.control_arm, r.bleed_arm) for records in arm if records[-1].stopped})
    if stopped:
        print(f"persona_lit: conversations stopped at the context limit ({stopped[0]}); results.json "
              f"run.last_turn says where each stopped")
    results = {
        "schema": RESULTS_SCHEMA,
        "run": {"ckpt": str(cfg.ckpt), "commit": commit, "model": backbone.name, "mechanism": mechanism.name,
                "persona": ", ".join(p.name for p in personas), "personas": list(by_persona),
                "turns": int(cfg.turns), "conversations": int(cfg.conversations), "probe_turns": probe_turns,
                "do_sample": bool(cfg.do_sample), "seed": cfg.seed, "max_new_tokens": int(cfg.max_new_tokens),
                "device": device.type if shards else str(device), "devices": shards.world_size if shards else 1,
                "precision": precision, "context_limit": runner.context_limit(), "last_turn": last_turn,
                "cut_at": cut_at,
                "capability_references": references_fingerprint(capability, int(cfg.capability_tokens)),
                "headline": headline(cfg, probe_turns),
                "protocol": protocol_info(cfg, protocol),
                "streams": {"per": "persona and conversation", "seed": cfg.seed,
                            "questions": {key: [[t.question_id for t in s] for s in group]
                                          for key, group in turns.persona_streams(list(by_persona)).items()}},
                "question_split": turns.split_info,
                **({"persona_split": chosen.info} if getattr(chosen, "info", None) else {})},
        **summarize(protocol, probe_turns, cfg.projection_layer, axis),
        "config": config,
    }
    if len(personas) > 1:  # the pooled metrics above, and each persona alone
        results["by_persona"] = {k: summarize(r, probe_turns, cfg.projection_layer, axis)["metrics"]
                                 for k, r in by_persona.items()}
    with staged_dir(out_dir) as tmp:  # written to a temporary sibling, renamed at the end
        write_report(tmp, results, protocol.persona_arm, protocol.control_arm, protocol.baseline_arm,
                     protocol.bleed_arm)
    log_results(cfg, results, out_dir, "+".join(by_persona))
    print(f"persona_lit: evaluation written to {out_dir} (report.md, results.json, transcript.jsonl, *.png)")
    return out_dir


def cut_to_common_turn(by_persona: dict[str, Any]) -> int | None:
    """Where the context limit stopped some conversations (a batch stops whole, so a later turn would pool only the
    conversations of the other batches, a different mix of personas): every arm of every conversation is cut to the
    last turn all of them reached, said in one line. Returns that turn, None where nothing was cut."""
    arms = [records for r in by_persona.values() for arm in (r.persona_arm, r.baseline_arm, r.control_arm,
                                                             r.bleed_arm) for records in arm]
    if not arms:
        return None
    common = min(records[-1].turn for records in arms)
    if all(records[-1].turn == common for records in arms):
        return None
    for records in arms:
        del records[common + 1 :]  # records[t] is turn t
    print(f"persona_lit: warning: some conversations stopped at the context limit after turn {common}: every arm of "
          f"every conversation is cut there (results.json run.cut_at), so no turn pools a different mix", flush=True)
    return common


RESULTS_SCHEMA = "persona_lit.results/2"  # 2: protocol, question_split, choice metrics, schema and commit recorded


def source_commit() -> str | None:
    """The git commit of the persona_lit checkout that ran (`+dirty` with uncommitted changes to tracked files),
    None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def protocol_info(cfg: DictConfig, protocol) -> dict[str, Any]:
    """results.json run.protocol: free-running, or replay with the hash of the transcript every arm read."""
    name = str(cfg.get("protocol") or "free")
    if name != "replay":
        return {"name": name}
    from persona_lit.evaluation.protocol import transcript_hash

    return {"name": name, "transcript": transcript_hash(protocol),
            "written_by": "the base model with the persona, greedy" if not cfg.do_sample else
            "the base model with the persona, sampled"}


def headline(cfg: DictConfig, probe_turns: list[int]) -> dict[str, Any]:
    """The run's declared headline comparison: headline.metric at headline.turn (null: the last probe turn)."""
    head = cfg.get("headline") or {}
    turn = head.get("turn")
    turn = (probe_turns[-1] if probe_turns else None) if turn is None else int(turn)
    return {"metric": str(head.get("metric") or "adherence/name"), "turn": turn}


def run_name(run: dict[str, Any]) -> str:
    """An evaluation's W&B name: mechanism, persona (or how many), protocol."""
    personas = run["personas"]
    who = (run["persona"] if personas[0].startswith("<") else personas[0]) if len(personas) == 1 \
        else f"{len(personas)}personas"  # a checkpoint's own persona: its name
    return f"eval-{run['mechanism']}-{who}-{run['protocol']['name']}"


def log_results(cfg: DictConfig, results: dict[str, Any], out_dir: Path, persona_key: str) -> None:
    """Per-turn curves with the turn as their x-axis (runs of different mechanisms overlay): each metric's mean and
    95% interval bounds (drift/<metric>, drift/<metric>/ci_low, /ci_high); plots as images (plots/<name>) and, on W&B, a table of
    every probe verdict (tables/probes). The config is the whole resolved evaluation config, the run block of results.json, and the
    training run the checkpoint came from (train_run: its directory and W&B run), whose group it joins."""
    run = results["run"]
    trained = training_run_of(cfg.get("ckpt"))
    config = {**plain(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])),
              "run": {k: v for k, v in run.items() if k not in ("streams", "last_turn")}, "train_run": trained}
    logger = make_logger(cfg.logger, str(out_dir), config, tags=[run["model"], run["mechanism"], "eval"],
                         group=(trained or {}).get("group") or run["mechanism"], name=run_name(run), job_type="eval")
    if not logger:
        return
    try:
        if cfg.logger.kind == "wandb":
            logger.experiment.define_metric("turn")
            logger.experiment.define_metric("drift/*", step_metric="turn")
        for turn_index, turn in enumerate(results["run"]["probe_turns"]):
            values: dict[str, float] = {"turn": turn}
            for name, m in results["metrics"].items():
                if turn not in m["turn"]:
                    continue
                i = m["turn"].index(turn)
                values[f"drift/{name}"] = m["mean"][i]
                for bound in ("ci_low", "ci_high"):
                    if (m.get(bound) or [None] * len(m["turn"]))[i] is not None:
                        values[f"drift/{name}/{bound}"] = m[bound][i]
            logger.log_metrics(values, step=turn)
        if cfg.logger.kind == "wandb":
            import json

            for png in sorted(out_dir.glob("*.png")):
                logger.log_image(f"plots/{png.stem}", [str(png)])
            rows = [[r["arm"], r["conversation"], p["turn"], p["kind"], p["question"], p["answer"], p["passed"],
                     p["margin"]] for r in map(json.loads, (out_dir / "transcript.jsonl").open()) for p in r["probes"]]
            logger.log_table("tables/probes", columns=["arm", "conversation", "turn", "kind", "question", "answer",
                                                      "passed", "margin"], data=rows)
    finally:
        logger.finalize("success")
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()
