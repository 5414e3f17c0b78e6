#!/usr/bin/python3
"""Writes the tiny vocabulary-only GGUF files the tokenizer tests ship
(tests/data/vocab-tiny-*.gguf): an SPM vocab (tokenizer.ggml.model = llama)
and a GPT-2 byte-level BPE vocab (gpt2) written seven times with different
tokenizer.ggml.pre values (gpt-2, qwen2, llama-bpe, default, falcon,
starcoder, deepseek-v3). Small on purpose (a few KB), hand-picked so that scores tie,
merges compete and byte fallback is needed. They carry the
hyper-parameter keys llama.cpp needs to load a vocab-only file, so its
llama-tokenize can produce the goldens (tools/gen_vocab_goldens.py).

usage: /usr/bin/python3 tools/gen_tiny_vocabs.py [tests/data]
"""
import os
import struct
import sys

# GGUF value types
U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9
# token types
NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6


def gguf_bytes(kvs):
    def s(x):
        b = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(b)) + b

    def val(t, v):
        if t == U32:
            return struct.pack("<I", v)
        if t == I32:
            return struct.pack("<i", v)
        if t == F32:
            return struct.pack("<f", v)
        if t == BOOL:
            return struct.pack("<B", 1 if v else 0)
        if t == STR:
            return s(v)
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(val(et, x) for x in items)

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for k, t, v in kvs:
        out += s(k) + struct.pack("<I", t) + val(t, v)
    return out


def hparams(arch):
    return [("general.architecture", STR, arch), ("general.name", STR, "tiny-" + arch),
            (arch + ".block_count", U32, 1), (arch + ".context_length", U32, 64),
            (arch + ".embedding_length", U32, 8), (arch + ".feed_forward_length", U32, 16),
            (arch + ".attention.head_count", U32, 1), (arch + ".attention.head_count_kv", U32, 1),
            (arch + ".attention.layer_norm_rms_epsilon", F32, 1e-5),
            (arch + ".attention.layer_norm_epsilon", F32, 1e-5),
            (arch + ".rope.dimension_count", U32, 8), ("general.file_type", U32, 0)]


def spm_vocab():
    E = "\u2581"
    toks = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    toks += [("<0x%02X>" % b, 0.0, BYTE) for b in range(256)]
    # (text, score): equal scores on purpose (ties go to the leftmost pair)
    pieces = [(E, -1.0), (E + E, -2.0), (E + E + E + E, -3.0), ("t", -4.0), ("h", -4.0), ("e", -4.0),
              ("l", -4.0), ("o", -4.0), ("w", -4.0), ("r", -4.0), ("d", -4.0), ("a", -4.0), ("c", -4.0),
              ("f", -4.0), ("s", -4.0), ("i", -4.0), ("n", -4.0), ("'", -4.0), ("1", -5.0), ("2", -5.0),
              ("3", -5.0), ("\u00e9", -5.0), ("\u4f60", -5.0), ("\u597d", -6.0),
              ("he", -2.5), ("ll", -2.5), ("llo", -2.0), ("hello", -1.5), (E + "t", -2.0), (E + "th", -1.8),
              (E + "the", -1.0), (E + "h", -2.2), (E + "he", -1.9), (E + "hello", -0.5), (E + "w", -2.1),
              ("or", -2.5), ("ld", -2.5), ("orld", -2.0), (E + "world", -0.7), ("caf", -2.0),
              (E + "caf", -1.2), ("caf\u00e9", -1.0), ("'s", -1.5), ("12", -2.0), ("123", -1.0),
              ("in", -2.5), ("is", -2.5), (E + "is", -1.5), (E + "i", -2.6), ("th", -3.0), ("at", -3.0),
              (E + "a", -2.6), ("\u4f60\u597d", -1.0), ("ed", -3.0), ("lo", -3.0), ("el", -3.0)]
    toks += [(t, sc, NORMAL) for t, sc in pieces]
    # "|>" lies inside "<|user|>": the longer special token must win
    toks += [("<|user|>", 0.0, USER), ("<|u|>", 0.0, USER), ("|>", 0.0, USER)]
    kvs = hparams("llama") + [
        ("llama.vocab_size", U32, len(toks)),
        ("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.pre", STR, "default"),
        ("tokenizer.ggml.tokens", ARR, (STR, [t for t, _, _ in toks])),
        ("tokenizer.ggml.scores", ARR, (F32, [sc for _, sc, _ in toks])),
        ("tokenizer.ggml.token_type", ARR, (I32, [ty for _, _, ty in toks])),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.ggml.add_eos_token", BOOL, False)]
    return gguf_bytes(kvs)


def byte_map():
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def gpt2_vocab(pre, add_bos):
    bm = byte_map()

    def enc(text):
        return "".join(bm[b] for b in text.encode())

    toks = [bm[b] for b in range(256)]
    # merges (rank order) on byte-encoded text; each adds its concatenation
    pairs = [(" ", "t"), ("h", "e"), (" t", "he"), (" ", "a"), ("l", "l"), ("o", "r"), (" ", "w"),
             (" w", "or"), (" wor", "l"), (" worl", "d"), ("e", "l"), ("el", "lo"), (" ", "h"), (" h", "el"),
             (" hel", "lo"), ("'", "s"), ("'", "re"), ("r", "e"), ("1", "2"), ("12", "3"), ("4", "5"),
             ("\u00e9"[0], ""), (" ", " "), ("  ", "  "), ("\n", "\n"), (" ", "\n"), ("c", "a"), ("ca", "f"),
             ("caf", "\u00e9"), (" ", "caf\u00e9"), ("i", "s"), (" ", "is"), ("\u4f60", "\u597d"),
             ("\t", "\t"), ("H", "e"), ("He", "llo"), ("!", "!"), ("l", "lo"), (" ", "!"), ("t", "h"),
             ("e", "r"), ("o", "u"), (" ", "you"), ("y", "ou"), ("'", "ll"), ("'", "ve"), ("'", "t"),
             ("d", "on"), ("o", "n"), ("don", "'t"), ("S", "x"), ("'", "S"), ("'", "R"), ("\u0661", "\u0662"), ("'R", "E"), ("123", "45"), ("~", "!"),
             ("`", "(")]
    merges = []
    have = set(toks)
    for a, b in pairs:
        if not b:
            continue
        ea, eb = enc(a), enc(b)
        for x in (ea, eb):  # partial tokens the pairs rely on (multi-byte chars)
            if x not in have:
                # build x from its bytes left to right
                cur = x[0]
                for ch in x[1:]:
                    merges.append(cur + " " + ch)
                    cur += ch
                    if cur not in have:
                        toks.append(cur)
                        have.add(cur)
        merges.append(ea + " " + eb)
        if ea + eb not in have:
            toks.append(ea + eb)
            have.add(ea + eb)
    toks += ["<|endoftext|>", "<|im_start|>", enc(" goodbye")]
    types = [NORMAL] * len(toks)
    types[len(toks) - 3] = CONTROL
    types[len(toks) - 2] = USER
    eos = len(toks) - 3
    kvs = hparams("gpt2") + [
        ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, pre),
        ("tokenizer.ggml.tokens", ARR, (STR, toks)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, merges)),
        ("tokenizer.ggml.bos_token_id", U32, eos), ("tokenizer.ggml.eos_token_id", U32, eos)]
    if add_bos is not None:
        kvs.append(("tokenizer.ggml.add_bos_token", BOOL, add_bos))
    return gguf_bytes(kvs)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    files = {"vocab-tiny-spm.gguf": spm_vocab(),
             "vocab-tiny-gpt2.gguf": gpt2_vocab("gpt-2", None),
             "vocab-tiny-qwen2.gguf": gpt2_vocab("qwen2", None),
             "vocab-tiny-llama3.gguf": gpt2_vocab("llama-bpe", None),
             "vocab-tiny-default.gguf": gpt2_vocab("default", True),
             "vocab-tiny-falcon.gguf": gpt2_vocab("falcon", None),
             "vocab-tiny-starcoder.gguf": gpt2_vocab("starcoder", None),
             "vocab-tiny-dsv3.gguf": gpt2_vocab("deepseek-v3", True)}
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print("wrote %s (%d bytes)" % (name, len(data)))


if __name__ == "__main__":
    main()
