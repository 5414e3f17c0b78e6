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
# the inference engine's models; the tokenizer's vocabs with a text appended
# (fuzz_vocab.c: the last byte is the length of the text before it)
mkdir -p "$out/gguf_model" "$out/vocab"
for f in tests/data/tiny-*.gguf; do
    [ -e "$f" ] && cp "$f" "$out/gguf_model/"
done
for f in tests/data/vocab-tiny-*.gguf; do
    [ -e "$f" ] || continue
    { cat "$f"; printf "Hello world, it's 42 <s></s>\\303\\251\\n"; printf '\\037'; } > "$out/vocab/$(basename "$f")"
done
# hf_dir: the one-file seed (build/fuzz_seed) also as two shards named by an index
/usr/bin/python3 fuzz/seed_hf_shards.py "$out/hf_dir/seed-tiny.hf" "$out/hf_dir/seed-tiny-sharded.hf"
for d in tests/data/fuzz/*/; do
    [ -d "$d" ] || continue
    t=$(basename "$d")
    mkdir -p "$out/$t"
    cp "$d"* "$out/$t/" 2>/dev/null || true
done
ls "$out" | while read -r t; do echo "  $t: $(ls "$out/$t" | wc -l) seeds"; done
