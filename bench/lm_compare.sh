#!/usr/bin/env bash
# make bench-lm: the small MoE preset against its dense twin (same active
# parameters per token, same tokens, same seed and schedule) on the Brown
# corpus; writes the loss curves to bench/lm_compare.svg and the table into
# the "LM comparison" section of bench/RESULTS.md (the rest is kept).
#   STEPS=2400 THREADS=2 bash bench/lm_compare.sh
# RUNS="small" retrains only the MoE and keeps bench/out/lm/small-dense (the
# dense model's code path is deterministic: a rerun reproduces it).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-2400}
THREADS=${THREADS:-2}
EVAL_EVERY=${EVAL_EVERY:-200}
PY=${PYTHON:-/usr/bin/python3}
MOE=./build/moe
out=bench/out/lm
mkdir -p "$out"
for p in ${RUNS:-small small-dense}; do
    echo "== $p: $STEPS steps"
    /usr/bin/time -v $MOE train --preset "$p" --steps "$STEPS" --threads "$THREADS" --eval-every "$EVAL_EVERY" \
        --eval-batches 16 --ckpt-every 0 --force --out "$out/$p" > "$out/$p.log" 2> "$out/$p.err"
    tail -2 "$out/$p.log"
done
$MOE plot "$out/small" "$out/small-dense" \
    --title "small MoE (16 experts top-2 + 1 shared) vs dense, equal active parameters" \
    --out bench/lm_compare.svg
"$PY" bench/lm_report.py "$out" "STEPS=$STEPS THREADS=$THREADS EVAL_EVERY=$EVAL_EVERY make bench-lm"
echo "updated bench/RESULTS.md and bench/lm_compare.svg"
