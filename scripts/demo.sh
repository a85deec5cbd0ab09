#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU, a few minutes): a short Lyra run that
# trains the chosen layers on long persona conversations, then the drift evaluation of its checkpoint
# over MT-bench turns: the trained mechanism, the baseline (the same persona as plain system prompt) and the
# control (no persona), 3 conversations for real intervals; report.md opens with "did it beat the baseline?".
# MECHANISM=lora bash scripts/demo.sh for the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
MECHANISM=${MECHANISM:-lyra}
EXTRA=()
if [[ $MECHANISM == lyra ]]; then
  EXTRA=(mechanism.options.train_layers=true data.chain_turns=2 data.filler_turns=1 data.max_length=768
         data.batch_size=2 module.distill_weight=1.0 module.optimizer.lr=5e-5)
fi
$PY train.py mechanism="$MECHANISM" trainer.max_steps="${STEPS:-20}" hydra.run.dir="$RUN/train" "${EXTRA[@]}" "$@"
$PY evaluate.py ckpt="$RUN/train" turns="${TURNS:-8}" "probe_turns=[0,1,4,8]" conversations="${CONVERSATIONS:-3}" \
  out_dir="$RUN/eval"
echo
echo "persona_lit demo finished ($MECHANISM):"
echo "  training run + checkpoint: $RUN/train/checkpoints/final.safetensors"
echo "  evaluation report:         $RUN/eval/report.md (results.json, transcript.jsonl, *.png)"
