#!/usr/bin/env bash
# Throughput on a busy machine (issue "One engine for every CPU", item 6):
# each workload idle and beside one CPU-bound process per core, with moe's
# default libgomp spin count (GOMP_SPINCOUNT=10000, set by the CLI) and with
# libgomp's own default (MOE_NO_REEXEC=1 keeps the CLI from setting it).
# The busy/idle ratio is what counts: a fair share is 50%, the target >= 40%.
#   bench/busy_machine.sh [ROUNDS]     (default 3; the median of the rounds)
#   SETTINGS="GOMP_SPINCOUNT=1000 GOMP_SPINCOUNT=100000" bench/busy_machine.sh
#     compares other environments too (each word one setting)
# Workloads: the GGUF engine's prompt (pp128) and decode (tg64) on a Q8_0
# file, `moe generate -m DIR` (the training model's decoder, 60 tokens) and
# `moe eval` (2 batches). The models are made here: small-mixtral trained
# for 20 steps on the Brown corpus, exported to Q8_0 (bench/out/busy/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
THREADS=${THREADS:-$(nproc)}
MOE=./build/moe
out=bench/out/busy
mkdir -p "$out"
make -s all
[ -d data/brown ] || bash scripts/fetch-brown.sh
if [ ! -f "$out/mx-q8_0.gguf" ]; then
    $MOE train --preset small-mixtral --steps 20 --force --out "$out/mx" -q > /dev/null
    $MOE convert -m "$out/mx" --out "$out/mx-q8_0.gguf" --type q8_0 > /dev/null
fi

hogs=()
start_hogs() { # one busy loop per core
    for _ in $(seq "$(nproc)"); do sh -c 'while :; do :; done' & hogs+=($!); done
    sleep 0.5
}
stop_hogs() { kill "${hogs[@]}" 2> /dev/null || true; wait "${hogs[@]}" 2> /dev/null || true; hogs=(); }
trap stop_hogs EXIT

# one measurement of workload $1 under env $2: prints a number (tokens/s)
measure() {
    local w=$1 envs=$2
    case $w in
    pp128 | tg64)
        env $envs $MOE bench engine -m "$out/mx-q8_0.gguf" -p 128 -n 64 -r 3 -t "$THREADS" 2> /dev/null |
            awk -F'|' -v t="$w" '$6 ~ t {gsub(/ /, "", $7); split($7, a, "±"); print a[1]}' ;;
    generate)
        env $envs $MOE generate -m "$out/mx" -p "The jury said" -n 60 --seed 1 -t "$THREADS" 2>&1 > /dev/null |
            sed -n 's/.*tokens at \([0-9.]*\) tokens\/s.*/\1/p' ;;
    eval)
        env $envs $MOE eval -m "$out/mx" --batches 2 --threads "$THREADS" --json 2> /dev/null |
            sed -n 's/.*"tokens": \([0-9.]*\), .*"seconds": \([0-9.]*\).*/\1 \2/p' | awk '{printf "%.0f\n", $1 / $2}' ;;
    esac
}

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

declare -A res
read -r -a settings <<< "moe libgomp ${SETTINGS:-}"
envof() { case $1 in moe) echo "X=1" ;; libgomp) echo "MOE_NO_REEXEC=1" ;; *) echo "$1" ;; esac; }
for r in $(seq "$ROUNDS"); do
    for load in idle busy; do
        [ "$load" = busy ] && start_hogs
        for s in "${settings[@]}"; do
            for w in pp128 tg64 generate eval; do
                v=$(measure "$w" "$(envof "$s")")
                res[$s,$load,$w]+="${v:-0} "
            done
        done
        [ "$load" = busy ] && stop_hogs
    done
    echo "round $r done" >&2
done

echo "| setting | workload | idle (t/s) | busy (t/s) | busy / idle |"
echo "|---|---|---:|---:|---:|"
for s in "${settings[@]}"; do
    for w in pp128 tg64 generate eval; do
        i=$(echo "${res[$s,idle,$w]}" | tr ' ' '\n' | grep . | median)
        b=$(echo "${res[$s,busy,$w]}" | tr ' ' '\n' | grep . | median)
        case $s in moe) label="moe default (GOMP_SPINCOUNT=10000)" ;; libgomp) label="libgomp default" ;; *) label=$s ;; esac
        awk -v l="$label" -v w="$w" -v i="$i" -v b="$b" 'BEGIN {printf "| %s | %s | %.1f | %.1f | %.0f%% |\n", l, w, i, b, (i > 0 ? 100 * b / i : 0)}'
    done
done
echo
echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $THREADS threads, $ROUNDS rounds (median), $(date -u +%F)"
