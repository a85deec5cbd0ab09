#!/usr/bin/env bash
# The main job on the embedded default: a short LoRA persona run on SmolLM2-135M-Instruct (CPU, a few
# minutes), then the drift evaluation of its checkpoint over MT-bench turns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
MECHANISM=${MECHANISM:-lora}
$PY train.py mechanism="$MECHANISM" trainer.max_steps="${STEPS:-30}" hydra.run.dir="$RUN/train" "$@"
$PY evaluate.py ckpt="$RUN/train" turns="${TURNS:-8}" out_dir="$RUN/eval"
echo
echo "persona_lit demo finished:"
echo "  training run + checkpoint: $RUN/train/checkpoints/final.safetensors (PEFT adapter: $RUN/train/checkpoints/peft_adapter)"
echo "  evaluation report:         $RUN/eval/report.md (results.json, transcript.jsonl, adherence.png)"
