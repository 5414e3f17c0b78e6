#!/usr/bin/env python3
"""Writes the hand-made hostile inputs of tests/data/fuzz/<target>/ (the
crash inputs found by fuzzing are committed there as they were found).
Files named ok-* must be accepted, every other one rejected, without a leak
or an allocation the file's size does not justify (tests/test_fuzz_regress.c).
    python3 fuzz/gen_regress.py tests/data/fuzz"""
import json
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fuzz"
SEP = b"\n--moe-file--\n"


def put(target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def safetensors(tensors, meta=None):
    """tensors: name -> (dtype, shape, bytes); offsets in the given order."""
    hdr, data = {}, b""
    if meta:
        hdr["__metadata__"] = meta
    for name, (dt, shape, raw) in tensors.items():
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


TINY = {"vocab_size": 260, "hidden_size": 4, "intermediate_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 8,
        "num_local_experts": 2, "num_experts_per_tok": 1, "dense_intermediate_size": 4}

# ---- config.json ----------------------------------------------------------------
put("config", "ok-tiny.json", json.dumps(TINY).encode())
# every key within its range, but 65536 experts x 256 layers = 50M tensors
put("config", "limit-tensor-count.json", json.dumps(dict(
    TINY, num_hidden_layers=256, num_local_experts=65536, num_experts_per_tok=2,
    max_position_embeddings=64)).encode())
# 3 x 65536 x 2^20 x 256 dense FFN parameters: past the 2^40 cap
put("config", "limit-param-count.json", json.dumps(dict(
    TINY, hidden_size=65536, num_local_experts=0, dense_intermediate_size=1 << 20,
    num_hidden_layers=256)).encode())
put("config", "deep-nesting.json", b"[" * 100000)
put("config", "not-an-object.json", b"[1, 2, 3]")

# ---- checkpoint directory (config.json, model.safetensors, optimizer, tokenizer) -----
one = safetensors({"x": ("F32", [1], b"\0\0\0\0")})
# 2^22 x 256 x 2 embedding parameters (8 GB with gradients) backed by 4 bytes:
# rejected before the model is allocated
big = dict(TINY, vocab_size=1 << 22, hidden_size=256, num_local_experts=0, head_dim=64, num_attention_heads=4,
           num_key_value_heads=4)
put("checkpoint", "params-without-weights.ckpt", json.dumps(big).encode() + SEP + one + SEP + SEP)
put("checkpoint", "limit-tensor-count.ckpt",
    open(os.path.join(out, "config", "limit-tensor-count.json"), "rb").read() + SEP + one + SEP + SEP)
put("checkpoint", "missing-tensor.ckpt", json.dumps(TINY).encode() + SEP +
    safetensors({"model.embed_tokens.weight": ("F32", [260, 4], b"\0" * 4 * 4 * 260)}) + SEP + SEP)

# ---- safetensors ---------------------------------------------------------------------
put("safetensors", "ok-one.safetensors", one)
put("safetensors", "header-past-eof.safetensors", struct.pack("<Q", 1 << 40) + b"{}")
put("safetensors", "offsets-past-eof.safetensors",
    struct.pack("<Q", 64) + json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    .encode().ljust(64) + b"\0" * 8)
put("safetensors", "shape-overflow.safetensors",
    safetensors({"x": ("F32", [1 << 40, 1 << 40], b"")}))

# ---- GGUF ------------------------------------------------------------------------
hdr = b"GGUF" + struct.pack("<I", 3)
put("gguf", "ok-empty.gguf", hdr + struct.pack("<QQ", 0, 0))
put("gguf", "limit-tensor-count.gguf", hdr + struct.pack("<QQ", 1 << 40, 0))
put("gguf", "limit-kv-count.gguf", hdr + struct.pack("<QQ", 0, 1 << 40))
put("gguf", "string-past-eof.gguf", hdr + struct.pack("<QQ", 0, 1) + gstr("k") + struct.pack("<IQ", 8, 1 << 50))
put("gguf", "array-past-eof.gguf",
    hdr + struct.pack("<QQ", 0, 1) + gstr("k") + struct.pack("<IIQ", 9, 4, 1 << 60))
put("gguf", "nested-arrays.gguf",
    hdr + struct.pack("<QQ", 0, 1) + gstr("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20)
put("gguf", "tensor-data-past-eof.gguf",
    hdr + struct.pack("<QQ", 1, 0) + gstr("t") + struct.pack("<I", 2) + struct.pack("<QQ", 1 << 20, 1 << 20)
    + struct.pack("<IQ", 0, 0))
put("gguf", "limit-n-dims.gguf",
    hdr + struct.pack("<QQ", 1, 0) + gstr("t") + struct.pack("<I", 5) + struct.pack("<Q", 1) * 5
    + struct.pack("<IQ", 0, 0))

# ---- tokenizer.json ------------------------------------------------------------------
put("tokenizer", "ok-257.json", json.dumps({"type": "moe-byte-bpe", "version": 1, "vocab_size": 257,
                                            "merges": [], "special": {"<|endoftext|>": 256}}).encode())
put("tokenizer", "limit-vocab.json", json.dumps({"type": "moe-byte-bpe", "version": 1, "vocab_size": 1 << 30,
                                                 "merges": [], "special": {"<|endoftext|>": (1 << 30) - 1}}).encode())
put("tokenizer", "merge-forward-ref.json", json.dumps({"type": "moe-byte-bpe", "version": 1, "vocab_size": 258,
                                                       "merges": [[256, 1]], "special": {"<|endoftext|>": 257}}).encode())

# ---- shards ------------------------------------------------------------------------
def shard(vocab, docs, tokens, n_tokens=None, n_docs=None):
    b = b"MOESHRD1" + struct.pack("<IIQI", 1, vocab, len(tokens) if n_tokens is None else n_tokens,
                                  len(docs) if n_docs is None else n_docs)
    for off, genre in docs:
        b += struct.pack("<QI", off, genre)
    return b + b"".join(struct.pack("<I", t) for t in tokens)


put("shard", "ok-one-doc.bin", shard(10, [(0, 0)], [1, 2, 9]))
put("shard", "counts-past-eof.bin", shard(10, [(0, 0)], [1, 2, 9], n_tokens=1 << 62))
put("shard", "n-tokens-past-cap-and-eof.bin", shard(10, [(0, 0)], [1, 2, 9], n_tokens=(1 << 32) + 1))
put("shard", "limit-vocab.bin", shard(1 << 30, [(0, 0)], [1, 2, 9]))
put("shard", "token-out-of-vocab.bin", shard(10, [(0, 0)], [1, 12, 9]))
put("shard", "doc-offset-past-end.bin", shard(10, [(0, 0), (7, 0)], [1, 2, 9]))

# ---- Brown corpus files ------------------------------------------------------------
put("corpus", "ok-one-sentence", b"\tThe/at jury/nn said/vbd ./.\n")
put("corpus", "bad-utf8", b"\tThe/at \xff\xfe/nn ./.\n")
put("corpus", "token-without-tag", b"\tThe jury/nn ./.\n")
put("corpus", "nul-byte", b"\tThe/at\x00 jury/nn ./.\n")
put("corpus", "no-words", b"\n\n\t\n")

# ---- GGUF tokenizer (fuzz_vocab.c: a GGUF, then a text whose length is the last byte) --
def gkv(key, typ, payload):
    return gstr(key) + struct.pack("<I", typ) + payload


def gkv_str(key, s):
    return gkv(key, 8, gstr(s))


def gkv_u32(key, v):
    return gkv(key, 4, struct.pack("<I", v))


def gkv_strs(key, items):
    return gkv(key, 9, struct.pack("<IQ", 8, len(items)) + b"".join(gstr(s) for s in items))


def gkv_f32s(key, items):
    return gkv(key, 9, struct.pack("<IQ", 6, len(items)) + struct.pack("<%df" % len(items), *items))


def gkv_i32s(key, items):
    return gkv(key, 9, struct.pack("<IQ", 5, len(items)) + struct.pack("<%di" % len(items), *items))


def gguf_kv(*kvs):
    return hdr + struct.pack("<QQ", 0, len(kvs)) + b"".join(kvs)


def vocab_input(*kvs, text=b"a a"):
    return gguf_kv(*kvs) + text + bytes([len(text)])


SPM = ["<unk>", "<s>", "</s>", "\u2581a", "a", "\u2581"]
spm_kvs = [gkv_str("tokenizer.ggml.model", "llama"), gkv_strs("tokenizer.ggml.tokens", SPM),
           gkv_f32s("tokenizer.ggml.scores", [0.0, 0.0, 0.0, -1.0, -2.0, -3.0]),
           gkv_i32s("tokenizer.ggml.token_type", [2, 3, 3, 1, 1, 1])]
put("vocab", "ok-spm-6.gguf", vocab_input(*spm_kvs))
put("vocab", "bos-out-of-range.gguf", vocab_input(*spm_kvs, gkv_u32("tokenizer.ggml.bos_token_id", 6)))
put("vocab", "scores-short.gguf", vocab_input(*spm_kvs[:2], gkv_f32s("tokenizer.ggml.scores", [0.0]), spm_kvs[3]))
put("vocab", "merge-forms-no-token.gguf", vocab_input(
    gkv_str("tokenizer.ggml.model", "gpt2"), gkv_strs("tokenizer.ggml.tokens", ["a", "b"]),
    gkv_strs("tokenizer.ggml.merges", ["a b"])))

# ---- inference engine: GGUF model, Hugging Face directory -------------------------------
# a Mixtral header declaring 2^20-wide, 256-layer, 65536-expert weights, none present
put("gguf_model", "dims-without-weights.gguf", gguf_kv(
    gkv_str("general.architecture", "llama"), gkv_u32("llama.embedding_length", 1 << 20),
    gkv_u32("llama.block_count", 256), gkv_u32("llama.expert_count", 65536),
    gkv_u32("llama.expert_used_count", 2), gkv_u32("llama.attention.head_count", 1 << 14),
    gkv_u32("llama.feed_forward_length", 1 << 20), gkv_u32("llama.context_length", 1 << 20)))
hf_cfg = json.dumps({"model_type": "mixtral", "vocab_size": 40, "hidden_size": 8, "intermediate_size": 8,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_local_experts": 2, "num_experts_per_tok": 1}).encode()
put("hf_dir", "index-names-parent-dir.hf", hf_cfg + SEP + SEP + json.dumps(
    {"weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}).encode())
put("hf_dir", "index-not-object.hf", hf_cfg + SEP + SEP + b"[]")
put("hf_dir", "missing-tensors.hf", hf_cfg + SEP + one)

# ---- train_state.json (moe train --resume) -------------------------------------------
STATE = {"step": 20, "tokens": 2560, "skipped_steps": 1, "loss_spikes": 0, "command": "moe train --steps 20",
         "train": [[1, 5.5], [2, 5.25]], "val": [[20, 4.75]]}


def state(**kw):
    d = dict(STATE)
    for k, v in kw.items():
        if v is DROP:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d).encode()


DROP = object()
put("train_state", "ok-full.json", state())
put("train_state", "ok-before-numerics.json", state(skipped_steps=DROP, loss_spikes=DROP, command=DROP))
put("train_state", "ok-null-command.json", state(command=None))
# found by fuzzing: cJSON's writer printed this loss with 15 digits, which read back 1 ulp off
put("train_state", "ok-loss-needs-17-digits.json", b'{"step": 8, "tokens": 0, "train": [[8, 3.3333333333333397]], "val": []}')
put("train_state", "missing-step.json", state(step=DROP))
put("train_state", "missing-val.json", state(val=DROP))
put("train_state", "step-fraction.json", state(step=1.5))
put("train_state", "step-negative.json", state(step=-1))
put("train_state", "step-huge.json", state(step=1e300))
put("train_state", "step-past-int.json", state(step=1 << 31))
put("train_state", "step-string.json", state(step="20"))
put("train_state", "tokens-infinite.json", state(tokens=DROP)[:-1] + b', "tokens": 1e400}')
put("train_state", "tokens-negative.json", state(tokens=-5))
put("train_state", "skipped-past-cap.json", state(skipped_steps=1 << 31))
put("train_state", "loss-spikes-bool.json", state(loss_spikes=True))
put("train_state", "command-number.json", state(command=7))
put("train_state", "command-too-long.json", state(command="x" * 70000))
put("train_state", "curve-not-array.json", state(train={"1": 5.5}))
put("train_state", "pair-three-values.json", state(train=[[1, 5.5, 0]]))
put("train_state", "pair-one-value.json", state(val=[[20]]))
put("train_state", "pair-not-array.json", state(val=[20]))
put("train_state", "pair-null-loss.json", state(val=[[20, None]]))
put("train_state", "pair-loss-string.json", state(val=[[20, "4.75"]]))
put("train_state", "pair-step-negative.json", state(val=[[-20, 4.75]]))
put("train_state", "pair-loss-infinite.json", state(val=DROP)[:-1] + b', "val": [[20, -1e999]]}')
# cJSON keeps both members; a lookup would take the first and ignore the second
put("train_state", "duplicate-step.json", state()[:-1] + b', "step": 999}')
put("train_state", "duplicate-train.json", state()[:-1] + b', "train": []}')
put("train_state", "duplicate-null-command.json", state(command=None)[:-1] + b', "command": "x"}')
put("train_state", "not-object.json", b"[1, 2]")
put("train_state", "not-json.json", state()[:-2])
put("train_state", "empty.json", b"")

# ---- checkpoint manifest / commit record (fuzz_ckpt_manifest.c: record, SEP, config.json;
# odd total size: written as checkpoint.commit, even: checkpoint.json) --------------------
def fnv1a64(b):
    h = 0xcbf29ce484222325
    for c in b:
        h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def manifest(files, step=3, **extra):
    return json.dumps(dict({"format": "moe-checkpoint", "version": 1, "step": step, "files": files},
                           **extra)).encode()


def listed(name, body):
    return {"name": name, "bytes": str(len(body)), "fnv1a64": "%016x" % fnv1a64(body)}


cfg = json.dumps(TINY).encode()
for parity in (0, 1):  # the same record as checkpoint.json and as checkpoint.commit
    rec = manifest([listed("config.json", cfg)])
    data = rec + SEP + cfg
    if len(data) % 2 != parity:
        rec = rec + b" "
        data = rec + SEP + cfg
    put("ckpt_manifest", "ok-config-only-%s" % ("commit" if parity else "manifest"), data)
# same size, other bytes: only the hash tells
put("ckpt_manifest", "hash-mismatch", manifest([listed("config.json", cfg.replace(b"1", b"2", 1))]) + SEP + cfg)
put("ckpt_manifest", "name-with-slash", manifest([listed("../config.json", cfg)]) + SEP + cfg)
put("ckpt_manifest", "too-many-files", manifest([listed("config.json", cfg)] * 9) + SEP + cfg)
put("ckpt_manifest", "step-out-of-range", manifest([listed("config.json", cfg)], step=1 << 31) + SEP + cfg)
put("ckpt_manifest", "bytes-not-a-number", manifest(
    [dict(listed("config.json", cfg), bytes="-1")]) + SEP + cfg)
put("ckpt_manifest", "not-json", b"{\"format\": \"moe-checkpoint\", " + SEP + cfg)
