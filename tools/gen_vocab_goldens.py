#!/usr/bin/python3
"""Golden token ids for the GGUF tokenizer tests (tests/test_vocab.c),
produced by llama.cpp's llama-tokenize, the reference (moe_vocab_encode is
llama_tokenize(parse_special = false), moe_vocab_encode_special either). Run by hand; needs a
llama.cpp build (its commit goes into docs/tokenizers.md):

  /usr/bin/python3 tools/gen_vocab_goldens.py LLAMA_TOKENIZE VOCAB.gguf... > OUT.golden

Each VOCAB gets a section "# vocab NAME" (the file's base name), then one line
per test string: the string's bytes in hex ("-" when empty), then the ids
(space-separated, "-" when none) with (add_special, parse_special) = (1, 0),
(0, 0), (1, 1), (0, 1); tab-separated. Strings llama.cpp cannot tokenize (it aborts)
are left out and tested separately.
"""
import os
import subprocess
import sys
import tempfile

E = "\u00e9"
STRINGS = [
    "", " ", "  ", "   ", "\n", "\n\n", "\t", " \t\n ", "a", "Hello", "Hello world", " Hello world",
    "Hello world ", "  Hello  world  ", "Hello\nworld", "Hello\n\nworld\n", "\tindented\ttabs",
    "hello   world", "hello\r\nworld", "line1\n  line2\n    line3",
    "it's", "It's", "IT'S", "we're", "they've", "I'm", "you'll", "he'd", "don't", "DON'T", "'s", "'", "''",
    "0", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "x2y3z4", " 42 ", "\u0661\u0662\u0663",
    "\u00bd \u2153", "Hello, world!", "!!!", "(a+b)*c=d", "a-b_c.d", "#include <stdio.h>", "`code`", "$100",
    "~tilde~ |pipe| ^caret^", "<=>", "email@example.com", "http://x.y/z?q=1&r=2",
    "caf" + E, "caf" + E + " au lait", "na\u00efve r\u00e9sum\u00e9", "Cafe\u0301", "\u00c5ngstr\u00f6m",
    "stra\u00dfe", "\u0130stanbul", "\u00a0nbsp\u00a0", "a\u2003em\u2009thin", "\u3000ideographic",
    "\u4f60\u597d", "\u4f60\u597d\u4e16\u754c", " \u4f60\u597d", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u0939\u093f\u0928\u094d\u0926\u0940",
    "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22", "\u03b1\u03b2\u03b3 \u0394", "\u041f\u0440\u0438\u0432\u0435\u0442",
    "\U0001f642", "\U0001f642\U0001f643", "emoji \U0001f680 rocket", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2581", "\u2581\u2581x", "\ufffd", "\u200b", "\x00", "a\x00b", "\x7f\x01", "\U0010ffff",
    "<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "a<s>b", "x</s> y", " <unk>",
    "<|endoftext|>Hello<|endoftext|>", "<s><s>", "<|im_start|><|endoftext|>", "a<|im_start|>b", "<|user|>", "x <|user|> y",
    "<|user|><|user|>", "<|u|>", "<|user|>hello", "goodbye", " goodbye", "the the the", "Hello!! world!!",
    "The quick brown fox jumps over the lazy dog.", "x`(y)", "a~!b ~!", "WE'RE", "IT'Sx", "12345 1234567",
    "    def f(x):\n        return x * 2\n",
]
# Invalid UTF-8 (as bytes): lone continuation, truncated sequences, bad lead
# bytes, overlong forms and surrogates (which llama.cpp decodes as they are).
BYTES = [b"\x80", b"a\x80b", b"\xc3", b"caf\xc3", b"\xc3(", b"\xe4\xbd", b"\xe4\xbd ok", b"\xf0\x9f\x99",
         b"\xff", b"\xfe\xff", b"\xf8\x88\x80\x80\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\xaf",
         b"\xed\xa0\x80", b"\xed\xbf\xbf x", b"x \xa9 y", b"\xe9t\xe9", b"\xc3\xc3\xa9",
         b"\xe4\xbd\xe4\xbd\xa0"]


def tokenize(tool, vocab, data, add_special, parse_special):
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
        path = f.name
    try:
        cmd = [tool, "-m", vocab, "-f", path, "--no-escape", "--ids", "--log-disable"]
        if not parse_special:  # llama-tokenize parses special tokens by default
            cmd.append("--no-parse-special")
        if not add_special:
            cmd.append("--no-bos")
        r = subprocess.run(cmd, capture_output=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        return None
    line = [l for l in r.stdout.decode().splitlines() if l.startswith("[")]
    if len(line) != 1:
        return None
    inner = line[0].strip()[1:-1].strip()
    return [int(x) for x in inner.split(",")] if inner else []


def main():
    tool, vocabs = sys.argv[1], sys.argv[2:]
    cases = [s.encode() for s in STRINGS] + BYTES
    print("# golden token ids from llama.cpp's llama-tokenize (tools/gen_vocab_goldens.py)")
    for v in vocabs:
        print("# vocab %s" % os.path.basename(v))
        for data in cases:
            r = [tokenize(tool, v, data, sp, ps) for ps in (False, True) for sp in (True, False)]
            if None in r:
                print("skipped %r: llama-tokenize failed" % data, file=sys.stderr)
                continue
            fmt = lambda ids: " ".join(map(str, ids)) if ids else "-"
            print("\t".join([data.hex() or "-"] + [fmt(x) for x in r]))


if __name__ == "__main__":
    main()
