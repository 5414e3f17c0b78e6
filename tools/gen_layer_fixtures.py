#!/usr/bin/python3
"""PyTorch reference fixtures for the C MoE layer (include/moe.h).

usage: /usr/bin/python3 tools/gen_layer_fixtures.py OUTDIR

Writes one safetensors file per fixture (layer_*.safetensors). The layer is
Hugging Face's MixtralSparseMoeBlock generalised to the options of
moe_layer_config:

  logits = x @ wg.T                                   [N,E]
  s      = softmax(logits) | sigmoid(logits)          [N,E]
  ids    = top-K of logits, decreasing (ties -> lower id)
  g_j    = scale * s[e_j] / (sum_K s[e_k] if renorm else 1)
  y[t]   = sum_j g_j * expert_{e_j}(x[t])
  expert = w2 @ (silu(w1 x) * (w3 x)) | w2 @ relu(w1 x) | w2 @ gelu_tanh(w1 x)
  aux    = E * sum_i f_i P_i,  f_i = count_i/(N K) (constant),
           P_i = mean_t q[t,i], q = s (softmax) or s / sum_e s (sigmoid)
  z      = mean_t logsumexp(logits[t])^2
  loss   = sum(y * dy) + aux_coef * aux + z_coef * z

(layer_formula also takes an optional cfg["aux_seq_len"] = S > 0, used by
tools/gen_model_fixture.py only: aux is then the same formula on each block
of S consecutive tokens, f_i = count_i/(n_b K) over its n_b tokens, averaged
over the blocks, as moe_layer_config.aux_seq_len.)

Everything is computed in float64 from float32-representable inputs and stored
as float32 (topk_ids as int32). Gradients are autograd's of `loss`. Inputs are
drawn from fixed seeds; a seed is bumped until routing has a clear margin, so
the C code (float32) routes every token exactly as the reference. Output bytes
are deterministic: regenerating gives identical files.
"""

import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

GENERATOR = "tools/gen_layer_fixtures.py"
MARGIN = 1e-2  # minimum logit gap around and inside the top-K

FIXTURES = [
    dict(name="layer_mixtral", N=16, C=32, F=48, E=8, K=2, act="swiglu",
         score="softmax", renorm=1, scale=1.0, aux_coef=0.01, z_coef=0.001,
         seed=1000),
    dict(name="layer_qwen_norenorm", N=12, C=24, F=40, E=8, K=3, act="swiglu",
         score="softmax", renorm=0, scale=1.0, aux_coef=0.01, z_coef=0.001,
         seed=2000),
    dict(name="layer_sigmoid_gelu", N=10, C=16, F=24, E=6, K=2, act="gelu",
         score="sigmoid", renorm=1, scale=2.5, aux_coef=0.02, z_coef=0.001,
         seed=3000),
    dict(name="layer_relu_top1", N=9, C=16, F=20, E=4, K=1, act="relu",
         score="softmax", renorm=0, scale=1.0, aux_coef=0.01, z_coef=0.0,
         seed=4000),
]


# ---- inputs ------------------------------------------------------------------

def make_inputs(cfg, seed):
    """float32 tensors drawn from a fixed seed (CPU generator: deterministic)."""
    N, C, Fd, E = cfg["N"], cfg["C"], cfg["F"], cfg["E"]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float32)
        return (t * std).to(torch.float32)

    inp = {}
    inp["x"] = randn(N, C)
    inp["wg"] = randn(E, C, std=C ** -0.5)
    inp["w1"] = randn(E, Fd, C, std=C ** -0.5)
    inp["w2"] = randn(E, C, Fd, std=Fd ** -0.5)
    # w3 is always drawn, so the stream is the same layout for every act.
    w3 = randn(E, Fd, C, std=C ** -0.5)
    if cfg["act"] == "swiglu":
        inp["w3"] = w3
    inp["dy"] = randn(N, C)
    return inp


def routing_margin(x, wg, K):
    """Smallest gap between consecutive sorted logits among the top K+1
    (covers the K-th/(K+1)-th boundary and the slot order inside the top K)."""
    logits = x.double() @ wg.double().T
    E = logits.shape[1]
    srt, _ = torch.sort(logits, dim=-1, descending=True)
    m = min(K + 1, E)
    if m < 2:
        return float("inf")
    gaps = srt[:, : m - 1] - srt[:, 1:m]
    return float(gaps.min())


# ---- the reference layer (formula) ------------------------------------------

def topk_ids(logits, K):
    """Top-K by logit, decreasing; ties -> lower expert id (stable sort)."""
    _, idx = torch.sort(logits.detach(), dim=-1, descending=True, stable=True)
    return idx[:, :K]


def expert_act(act, h1, h3):
    if act == "swiglu":
        return F.silu(h1) * h3
    if act == "relu":
        return F.relu(h1)
    if act == "gelu":
        return F.gelu(h1, approximate="tanh")
    raise ValueError(act)


def layer_formula(cfg, x, wg, w1, w2, w3, dy):
    """Returns dict with y, ids, weights, aux, z, loss (tensors with grad)."""
    N, C, E, K = cfg["N"], cfg["C"], cfg["E"], cfg["K"]
    logits = x @ wg.T                                           # [N,E]
    if cfg["score"] == "softmax":
        s = torch.softmax(logits, dim=-1)
        q = s
    elif cfg["score"] == "sigmoid":
        s = torch.sigmoid(logits)
        q = s / s.sum(-1, keepdim=True)
    else:
        raise ValueError(cfg["score"])
    ids = topk_ids(logits, K)                                   # [N,K]
    sel = s.gather(1, ids)                                      # [N,K]
    if cfg["renorm"]:
        sel = sel / sel.sum(-1, keepdim=True)
    gw = cfg["scale"] * sel                                     # [N,K]

    # Every expert on every token, then keep the chosen ones (the unchosen
    # outputs get no gradient).
    h1 = torch.einsum("efc,nc->nef", w1, x)                     # [N,E,F]
    h3 = torch.einsum("efc,nc->nef", w3, x) if w3 is not None else None
    a = expert_act(cfg["act"], h1, h3)
    out = torch.einsum("ecf,nef->nec", w2, a)                   # [N,E,C]
    out_sel = out.gather(1, ids[:, :, None].expand(N, K, C))    # [N,K,C]
    y = (gw[:, :, None] * out_sel).sum(1)                       # [N,C]

    S = cfg.get("aux_seq_len", 0)
    if S:
        # per block of S tokens (the last may be shorter), mean over blocks
        nblk = (N + S - 1) // S
        blk = torch.arange(N) // S                              # block of each token
        ntok = torch.bincount(blk, minlength=nblk).to(x.dtype)  # [nblk]
        slots = F.one_hot(ids, E).sum(1).to(x.dtype)            # [N,E] slots per token
        cnt = torch.zeros(nblk, E, dtype=x.dtype).index_add(0, blk, slots)
        f = cnt / (ntok[:, None] * K)                           # constant
        P = torch.zeros(nblk, E, dtype=x.dtype).index_add(0, blk, q) / ntok[:, None]
        aux = (E * (f * P).sum(-1)).mean()
    else:
        counts = torch.bincount(ids.reshape(-1), minlength=E).to(x.dtype)
        f = counts / (N * K)                                    # constant
        P = q.mean(0)
        aux = E * (f * P).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    loss = (y * dy).sum() + cfg["aux_coef"] * aux + cfg["z_coef"] * z
    return dict(y=y, ids=ids, weights=gw, aux=aux, z=z, loss=loss)


# ---- Hugging-Face-style implementation (cross-check) ------------------------

class Expert(torch.nn.Module):
    def __init__(self, act, w1, w2, w3):
        super().__init__()
        self.act = act
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, hidden_states):
        h1 = hidden_states @ self.w1.T
        h3 = hidden_states @ self.w3.T if self.w3 is not None else None
        return expert_act(self.act, h1, h3) @ self.w2.T


def layer_hf(cfg, x, wg, w1, w2, w3):
    """MixtralSparseMoeBlock.forward, generalised (score/renorm/scale/act)."""
    E, K = cfg["E"], cfg["K"]
    hidden_states = x
    sequence_length, hidden_dim = hidden_states.shape
    router_logits = hidden_states @ wg.T
    if cfg["score"] == "softmax":
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float64)
    else:
        routing_weights = torch.sigmoid(router_logits)
    routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
    if cfg["renorm"]:
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights * cfg["scale"]
    routing_weights = routing_weights.to(hidden_states.dtype)

    experts = [Expert(cfg["act"], w1[e], w2[e], w3[e] if w3 is not None else None)
               for e in range(E)]
    final_hidden_states = torch.zeros((sequence_length, hidden_dim),
                                      dtype=hidden_states.dtype)
    expert_mask = F.one_hot(selected_experts, num_classes=E).permute(2, 1, 0)
    for expert_idx in range(E):
        expert_layer = experts[expert_idx]
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = (expert_layer(current_state)
                                 * routing_weights[top_x, idx, None])
        final_hidden_states.index_add_(
            0, top_x, current_hidden_states.to(hidden_states.dtype))
    return final_hidden_states, selected_experts, routing_weights


# ---- one fixture ---------------------------------------------------------------

PARAM_NAMES = ["x", "wg", "w1", "w2", "w3"]


def run_reference(cfg, inp, dtype):
    leaves = {k: inp[k].to(dtype).clone().requires_grad_(True)
              for k in PARAM_NAMES if k in inp}
    dy = inp["dy"].to(dtype)
    r = layer_formula(cfg, leaves["x"], leaves["wg"], leaves["w1"],
                      leaves["w2"], leaves.get("w3"), dy)
    names = [k for k in PARAM_NAMES if k in leaves]
    grads = torch.autograd.grad(r["loss"], [leaves[k] for k in names])
    r["grads"] = {"d" + k: g.detach() for k, g in zip(names, grads)}
    return r, leaves


def build_fixture(cfg):
    K, E = cfg["K"], cfg["E"]
    seed = cfg["seed"]
    for _ in range(1000):
        inp = make_inputs(cfg, seed)
        if K >= E or routing_margin(inp["x"], inp["wg"], K) >= MARGIN:
            break
        seed += 1
    else:
        raise RuntimeError("%s: no seed with routing margin" % cfg["name"])

    r64, leaves64 = run_reference(cfg, inp, torch.float64)
    r32, _ = run_reference(cfg, inp, torch.float32)

    # Sanity: float32 and float64 agree (same routing, small differences).
    assert torch.equal(r64["ids"], r32["ids"]), cfg["name"] + ": routing differs f32/f64"
    pairs = [("y", r64["y"], r32["y"]), ("topk_weights", r64["weights"], r32["weights"]),
             ("aux_raw", r64["aux"], r32["aux"]), ("z_raw", r64["z"], r32["z"]),
             ("loss", r64["loss"], r32["loss"])]
    pairs += [(k, r64["grads"][k], r32["grads"][k]) for k in r64["grads"]]
    for k, a, b in pairs:
        a = a.detach().double()
        b = b.detach().double()
        diff = float((a - b).abs().max())
        tol = 1e-4 * max(1.0, float(a.abs().max()))
        assert diff <= tol, "%s: %s f32 vs f64 diff %g > %g" % (cfg["name"], k, diff, tol)

    # Cross-check with the Hugging-Face-style loop (float64).
    with torch.no_grad():
        y_hf, ids_hf, w_hf = layer_hf(cfg, *(leaves64[k].detach() if k in leaves64 else None
                                            for k in PARAM_NAMES))
    assert torch.equal(ids_hf, r64["ids"]), cfg["name"] + ": HF routing differs"
    d_w = float((w_hf - r64["weights"].detach()).abs().max())
    assert d_w <= 1e-12, "%s: HF gate weights differ by %g" % (cfg["name"], d_w)
    d_y = float((y_hf - r64["y"].detach()).abs().max())
    assert d_y <= 1e-10, "%s: HF y differs by %g" % (cfg["name"], d_y)

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    tensors = {k: inp[k] for k in ["x", "wg", "w1", "w2", "w3", "dy"] if k in inp}
    tensors["y"] = f32(r64["y"])
    tensors["topk_ids"] = r64["ids"].to(torch.int32).contiguous()
    tensors["topk_weights"] = f32(r64["weights"])
    tensors["aux_raw"] = f32(r64["aux"].reshape(1))
    tensors["z_raw"] = f32(r64["z"].reshape(1))
    tensors["loss"] = f32(r64["loss"].reshape(1))
    for k, g in r64["grads"].items():
        tensors[k] = f32(g)

    meta = {
        "N": str(cfg["N"]), "C": str(cfg["C"]), "F": str(cfg["F"]),
        "E": str(cfg["E"]), "K": str(cfg["K"]),
        "act": cfg["act"], "score": cfg["score"], "renorm": str(cfg["renorm"]),
        "scale": repr(float(cfg["scale"])), "aux_coef": repr(float(cfg["aux_coef"])),
        "z_coef": repr(float(cfg["z_coef"])), "seed": str(seed),
        "generator": GENERATOR, "torch_version": torch.__version__,
    }
    return tensors, meta, r64


# ---- safetensors ----------------------------------------------------------------

DTYPES = {torch.float32: ("F32", "<f4"), torch.int32: ("I32", "<i4")}


def safetensors_bytes(tensors, meta):
    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name]
        code, npdt = DTYPES[t.dtype]
        b = t.numpy().astype(npdt, copy=False).tobytes(order="C")
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = dict(meta)
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)


def read_safetensors(path):
    """Minimal reader, used to check what was written."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        npdt = {"F32": "<f4", "I32": "<i4"}[h["dtype"]]
        out[name] = np.frombuffer(data[b:e], dtype=npdt).reshape(h["shape"])
    return out, meta


def write_atomic(path, data):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_fixture(outdir, name, tensors, meta):
    """Writes name.safetensors atomically, reads it back and checks every
    tensor and the metadata; returns the number of bytes written."""
    blob = safetensors_bytes(tensors, meta)
    path = os.path.join(outdir, name + ".safetensors")
    write_atomic(path, blob)
    back, bmeta = read_safetensors(path)
    assert bmeta == meta and sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert np.array_equal(back[k], t.numpy()), k
    return len(blob)


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        sys.stderr.write("usage: %s OUTDIR\n" % argv[0])
        return 2
    outdir = argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(1)
    total = 0
    for cfg in FIXTURES:
        tensors, meta, r64 = build_fixture(cfg)
        nbytes = write_fixture(outdir, cfg["name"], tensors, meta)
        total += nbytes
        print("%-22s max|y|=%.6f loss=%.9g seed=%s bytes=%d"
              % (cfg["name"], float(tensors["y"].abs().max()),
                 float(tensors["loss"][0]), meta["seed"], nbytes))
    print("total %d bytes in %s" % (total, outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
