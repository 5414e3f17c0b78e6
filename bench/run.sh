#!/usr/bin/env bash
# make bench: the MoE layer (moe) against the Hugging Face Mixtral block in
# PyTorch (bench/peer_torch.py) on the same shapes, threads and OpenBLAS
# kernel, plus the OpenBLAS sgemm ceiling; writes bench/RESULTS.md.
#   THREADS=2 REPS=5 WARMUP=2 bash bench/run.sh
# Both peers run under the OPENBLAS_CORETYPE of the environment, and, on a CPU
# with AVX-512 where that is not already an AVX-512 kernel, under SkylakeX too.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
REPS=${REPS:-5}
WARMUP=${WARMUP:-2}
PY=${PYTHON:-/usr/bin/python3}
MOE=./build/moe
out=bench/out
mkdir -p "$out"
rm -f "$out"/*.jsonl

# the kernel OpenBLAS picks under this environment
default_core=$(MOE_NO_REEXEC=1 $MOE bench sgemm --size 64 --reps 1 --json | sed 's/.*"core":"\([^"]*\)".*/\1/')
cores=("$default_core")
if grep -q avx512f /proc/cpuinfo && [ "$default_core" != "SkylakeX" ] && [ "$default_core" != "Cooperlake" ] \
   && [ "$default_core" != "SapphireRapids" ]; then
    cores+=("SkylakeX")
fi

for core in "${cores[@]}"; do
    echo "== OpenBLAS kernel $core, $THREADS threads"
    export OPENBLAS_CORETYPE=$core MOE_NO_REEXEC=1
    $MOE bench sgemm --threads "$THREADS" --json | tee -a "$out/sgemm.jsonl"
    for pass in fwd fwdbwd; do
        $MOE bench layer --pass $pass --threads "$THREADS" --reps "$REPS" --warmup "$WARMUP" --json \
            | tee -a "$out/moe.jsonl"
        "$PY" bench/peer_torch.py --pass $pass --threads "$THREADS" --reps "$REPS" --warmup "$WARMUP" --json \
            | sed "s/}$/, \"core\": \"$core\"}/" | tee -a "$out/torch.jsonl"
    done
    # routing overhead (router + dispatch + combine, excluding expert GEMMs) on S1
    for router in topk noisy-topk switch gshard expert-choice sigmoid-bias hierarchical balanced; do
        $MOE bench layer --shape S1 --router $router --threads "$THREADS" --reps "$REPS" --warmup "$WARMUP" --json \
            | tee -a "$out/router.jsonl"
    done
    # training steps of the small preset vs its PyTorch twin, same batch
    $MOE info --preset small --print-config > "$out/small.json"
    $MOE bench train --preset small --batch 8 --seq 256 --steps "$((REPS * 2))" --warmup "$WARMUP" \
        --threads "$THREADS" --json | tee -a "$out/train.jsonl"
    "$PY" bench/peer_train_torch.py --config "$out/small.json" --batch 8 --seq 256 --steps "$REPS" \
        --warmup "$WARMUP" --threads "$THREADS" --json | sed "s/}$/, \"core\": \"$core\"}/" | tee -a "$out/train.jsonl"
done
"$PY" bench/report.py "$out" "THREADS=$THREADS REPS=$REPS WARMUP=$WARMUP make bench" > bench/RESULTS.md.tmp
mv bench/RESULTS.md.tmp bench/RESULTS.md
echo "wrote bench/RESULTS.md"
