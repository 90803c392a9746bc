#!/usr/bin/env bash
# The README's main job, end to end on the bundled digits (scikit-learn's 8x8 images, no download):
#   1. install into .venv (skipped when .venv already has the `lightning-sketch` command);
#   2. train with GradientSketch + HessianSpectrum (configs/digits.yaml);
#   3. second stage: the intrinsic-dimension search (configs/intrinsic.yaml) into $RUN/intrinsic
#      (it reparametrises the model as θ = θ0 + Φᵀω, so it runs apart from stage 2);
#   4. answer an attribution query (top proponents/opponents of test images 0, 1, 2);
#   5. write the HTML report $RUN/report.html.
# Usage: bash examples/main_job.sh            (RUN=runs/other bash examples/main_job.sh to move it)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/digits}
if [ ! -x .venv/bin/lightning-sketch ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q torch==2.13.0           # the CPU wheel first: lightning then keeps it
  .venv/bin/pip install -q -e ".[dev]"             # dev adds scikit-learn (digits) and tensorboard
fi
LS=.venv/bin/lightning-sketch
t0=$(date +%s)
$LS fit --config configs/digits.yaml --trainer.default_root_dir="$RUN"
t1=$(date +%s)
$LS fit --config configs/intrinsic.yaml --trainer.default_root_dir="$RUN/intrinsic"
t2=$(date +%s)
QUERY=(--store "$RUN/sketch" --ckpt "$RUN/checkpoints/last.ckpt" --config configs/digits.yaml --ids 0,1,2 --k 5)
$LS query "${QUERY[@]}"
$LS query "${QUERY[@]}" --format json --output "$RUN/query.json"
$LS inspect "$RUN/sketch"
$LS report "$RUN"
t3=$(date +%s)
echo "main job done: fit $((t1 - t0)) s, intrinsic $((t2 - t1)) s, query+inspect+report $((t3 - t2)) s; open $RUN/report.html"
