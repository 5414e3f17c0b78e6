#!/usr/bin/env bash
# The GGUF engine against llama.cpp on the same files and threads (issue 6):
# llama-bench and `moe bench engine` alternate file by file and round by
# round (the same protocol: pp N as one batch, tg N one token at a time, from
# an empty cache), then `moe bench bandwidth` gives the read ceiling.
#   LLAMA_BIN=/path/to/llama.cpp/build/bin bash bench/engine_vs_llama.sh FILE.gguf...
# MOE_ARGS adds flags to `moe bench engine` (e.g. MOE_ARGS=--repack-all).
# llama.cpp is built outside the repository and never committed. Run on an
# idle machine: two threads that spin at barriers measure the scheduler when
# anything else runs. Prints markdown rows: file, test, llama.cpp t/s, ours, ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_BIN:?set LLAMA_BIN to the build/bin folder of llama.cpp}"
THREADS=${THREADS:-2}
PP=${PP:-128}
TG=${TG:-64}
REPS=${REPS:-5}
ROUNDS=${ROUNDS:-2}
MOE=./build/moe
[ $# -gt 0 ] || { echo "usage: LLAMA_BIN=... $0 FILE.gguf..." >&2; exit 2; }
export LD_LIBRARY_PATH="$LLAMA_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for round in $(seq "$ROUNDS"); do
    for f in "$@"; do
        b=$(basename "$f")
        "$LLAMA_BIN/llama-bench" -m "$f" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" -o csv 2>/dev/null |
            awk -F, -v b="$b" 'NR > 1 { gsub(/"/, ""); for (i = 1; i <= NF; i++) h[i] = $i }
                NR == 1 { gsub(/"/, ""); for (i = 1; i <= NF; i++) c[$i] = i; next }
                { t = h[c["n_prompt"]] > 0 ? "pp" h[c["n_prompt"]] : "tg" h[c["n_gen"]];
                  print b, t, h[c["avg_ts"]] }' >> "$tmp/llama"
        # shellcheck disable=SC2086 # MOE_ARGS: several flags
        $MOE bench engine ${MOE_ARGS:-} -m "$f" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" |
            awk -F'|' -v b="$b" '/pp[0-9]|tg[0-9]/ { gsub(/ /, "", $6); split($7, a, " "); gsub(/ /, "", $9);
                print b, $6, a[1], $9 }' >> "$tmp/moe"
    done
done
echo "| file | test | llama.cpp t/s | moe t/s | ratio | moe GB/s (decode) |"
echo "|---|---|---:|---:|---:|---:|"
# the best round of each (the machine's noise only ever slows a run down)
awk 'FNR == NR { k = $1 " " $2; if ($3 > l[k]) l[k] = $3; next }
     { k = $1 " " $2; if ($3 > m[k]) { m[k] = $3; g[k] = $4 } ; keys[k] = 1 }
     END { for (k in keys) { split(k, a, " "); printf "| %s | %s | %.1f | %.1f | %.2fx | %s |\n", a[1], a[2], l[k], m[k], m[k] / l[k], g[k] } }' \
    "$tmp/llama" "$tmp/moe" | sort
echo
$MOE bench bandwidth -t "$THREADS"
