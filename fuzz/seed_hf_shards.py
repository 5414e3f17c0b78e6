"""Seeds fuzz_hf_dir's sharded layout: reads a one-file seed (config.json and
model.safetensors joined by the separator of fuzz/fuzz_hf_dir.c) and writes
the same model as model.safetensors.index.json plus two shards, the tensors
split in halves (the model.safetensors part left empty, so that the loader
takes the index).  Usage: seed_hf_shards.py IN OUT"""
import json
import struct
import sys

SEP = b"\n--moe-file--\n"


def st_split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    head = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = head.pop("__metadata__", None)
    names = sorted(head, key=lambda k: head[k]["data_offsets"][0])
    return meta, [(k, head[k], data[head[k]["data_offsets"][0]:head[k]["data_offsets"][1]]) for k in names]


def st_write(meta, tensors):
    head, data, off = {}, b"", 0
    if meta is not None:
        head["__metadata__"] = meta
    for name, info, raw in tensors:
        head[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(head, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    parts = open(sys.argv[1], "rb").read().split(SEP)
    config, model = parts[0], parts[1]
    meta, tensors = st_split(model)
    half = len(tensors) // 2
    shards = [tensors[:half], tensors[half:]]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {t[0]: names[i] for i in range(2) for t in shards[i]}}
    out = [config, b"", json.dumps(index, indent=1).encode()] + [st_write(meta, s) for s in shards]
    open(sys.argv[2], "wb").write(SEP.join(out))


main()
