#!/bin/sh
# Seeds the fuzz corpora (fuzz/corpus/<target>, gitignored): files written by
# the project's writers (build/fuzz_seed) plus the committed files of
# tests/data and the regression inputs of tests/data/fuzz.
set -e
out=${1:-fuzz/corpus}
mkdir -p "$out"
./build/fuzz_seed "$out"
for f in tests/data/*.safetensors; do
    [ -e "$f" ] && cp "$f" "$out/safetensors/"
done
for d in tests/data/fuzz/*/; do
    [ -d "$d" ] || continue
    t=$(basename "$d")
    mkdir -p "$out/$t"
    cp "$d"* "$out/$t/" 2>/dev/null || true
done
ls "$out" | while read -r t; do echo "  $t: $(ls "$out/$t" | wc -l) seeds"; done
