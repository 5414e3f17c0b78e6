#!/usr/bin/python3
"""PyTorch reference fixture for the noisy top-k router (src/router/noisy.c).

usage: /usr/bin/python3 tools/gen_noisy_fixture.py OUTDIR

Writes OUTDIR/router_noisy.safetensors: one training forward and backward of
a SwiGLU MoE layer with router MOE_ROUTER_NOISY_TOPK (Shazeer et al. 2017):

  lg   = x @ wg.T                                     [N,E] clean logits
  xn   = x @ wnoise.T                                 [N,E]
  std  = softplus(xn)
  H    = lg + eps * std                               eps: the layer's draws
  ids  = top-K of H, decreasing (ties -> lower id)
  g    = scale * softmax(H[ids])                      [N,K]
  y[t] = sum_j g_j * w2 @ (silu(w1 x) * (w3 x))
  P    = Phi((lg - thr) / std), thr = (K+1)-th H for experts in the top K,
         K-th H for the others
  load = load_coef * cv2(sum_t P),  imp = importance_coef * cv2(sum of g per expert)
  cv2(v) = mean((v - mean v)^2) / (mean(v)^2 + 1e-10)   (population variance)
  aux  = aux_coef * E * sum_i f_i mean_t softmax(lg)_i, f_i = count_i/(N K) (constant)
  z    = z_coef * mean_t logsumexp(lg_t)^2
  loss = sum(y * dy) + aux + z + imp + load

eps reproduces moe__router_normal (src/router/router.c) bit for bit: the
counter-based splitmix64 hash of (seed, call, token, index), Box-Muller on two
53-bit uniforms in double, rounded to float32. The C test checks the bits.

Everything is computed in float64 from float32 inputs and stored as float32
(topk_ids as int32); gradients are autograd's of `loss`. The data seed is
bumped until the noisy routing has a clear margin, so the float32 C code
routes every token as the reference does. Output bytes are deterministic.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_layer_fixtures import write_fixture  # noqa: E402

GENERATOR = "tools/gen_noisy_fixture.py"
MARGIN = 1e-2  # minimum gap between consecutive noisy logits in the top K+1

CFG = dict(name="router_noisy", N=16, C=16, F=16, E=6, K=2, scale=1.0,
           aux_coef=0.01, z_coef=0.001, importance_coef=0.1, load_coef=0.1,
           seed=20170123, call=3, data_seed=5000)

# ---- moe__router_normal ------------------------------------------------------

M64 = (1 << 64) - 1


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def draw(seed, call, t, i):
    base = mix64((mix64(seed ^ 0x6D6F65726F757465) + call) & M64)
    return mix64((base + (((t & 0xFFFFFFFF) << 32) | (i & 0xFFFFFFFF))) & M64)


def router_normal(seed, call, t, i):
    a, b = draw(seed, call, t, 2 * i), draw(seed, call, t, 2 * i + 1)
    u1 = ((a >> 11) + 1) * 2.0 ** -53
    u2 = (b >> 11) * 2.0 ** -53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)


def noise_draws(cfg):
    N, E = cfg["N"], cfg["E"]
    v = [[router_normal(cfg["seed"], cfg["call"], t, e) for e in range(E)] for t in range(N)]
    return torch.tensor(v, dtype=torch.float64).to(torch.float32)


# ---- inputs --------------------------------------------------------------------

def make_inputs(cfg, seed):
    N, C, Fd, E = cfg["N"], cfg["C"], cfg["F"], cfg["E"]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).to(torch.float32)

    inp = {}
    inp["x"] = randn(N, C)
    inp["wg"] = randn(E, C, std=1.5 * C ** -0.5)
    inp["wnoise"] = randn(E, C, std=0.8 * C ** -0.5)
    inp["w1"] = randn(E, Fd, C, std=C ** -0.5)
    inp["w2"] = randn(E, C, Fd, std=Fd ** -0.5)
    inp["w3"] = randn(E, Fd, C, std=C ** -0.5)
    inp["dy"] = randn(N, C)
    return inp


def noisy_margin(inp, eps, K):
    x = inp["x"].double()
    xn = x @ inp["wnoise"].double().T
    H = x @ inp["wg"].double().T + eps.double() * softplus(xn)
    srt, _ = torch.sort(H, dim=-1, descending=True)
    return float((srt[:, :K] - srt[:, 1:K + 1]).min())


# ---- the reference ------------------------------------------------------------------

def softplus(v):
    """log(1 + e^v) without torch's linear cut-off above 20."""
    return torch.relu(v) + torch.log1p(torch.exp(-v.abs()))


def cv2(v):
    m = v.mean()
    return ((v - m) ** 2).mean() / (m * m + 1e-10)


def layer_formula(cfg, eps, x, wg, wnoise, w1, w2, w3, dy):
    N, C, E, K = cfg["N"], cfg["C"], cfg["E"], cfg["K"]
    lg = x @ wg.T                                               # [N,E]
    std = softplus(x @ wnoise.T)                                # [N,E]
    H = lg + eps.to(x.dtype) * std                              # [N,E]
    _, order = torch.sort(H.detach(), dim=-1, descending=True, stable=True)
    ids = order[:, :K]                                          # [N,K]
    gw = cfg["scale"] * torch.softmax(H.gather(1, ids), dim=-1)

    h1 = torch.einsum("efc,nc->nef", w1, x)                     # [N,E,F]
    h3 = torch.einsum("efc,nc->nef", w3, x)
    out = torch.einsum("ecf,nef->nec", w2, torch.nn.functional.silu(h1) * h3)
    out_sel = out.gather(1, ids[:, :, None].expand(N, K, C))    # [N,K,C]
    y = (gw[:, :, None] * out_sel).sum(1)                       # [N,C]

    in_top = torch.zeros(N, E, dtype=torch.bool).scatter_(1, ids, True)
    thr_in = H.gather(1, order[:, K:K + 1])                     # (K+1)-th
    thr_out = H.gather(1, order[:, K - 1:K])                    # K-th
    thr = torch.where(in_top, thr_in, thr_out)
    P = 0.5 * torch.erfc(-(lg - thr) / std / math.sqrt(2.0))
    load = cfg["load_coef"] * cv2(P.sum(0))
    imp_v = torch.zeros(E, dtype=x.dtype).scatter_add(0, ids.reshape(-1), gw.reshape(-1))
    imp = cfg["importance_coef"] * cv2(imp_v)

    counts = torch.bincount(ids.reshape(-1), minlength=E).to(x.dtype)
    aux = cfg["aux_coef"] * E * (counts / (N * K) * torch.softmax(lg, -1).mean(0)).sum()
    z = cfg["z_coef"] * (torch.logsumexp(lg, dim=-1) ** 2).mean()
    loss = (y * dy).sum() + aux + z + imp + load
    return dict(y=y, ids=ids, weights=gw, aux=aux, z=z, imp=imp, load=load, loss=loss)


PARAMS = ["x", "wg", "wnoise", "w1", "w2", "w3"]


def run_reference(cfg, inp, eps, dtype):
    leaves = {k: inp[k].to(dtype).clone().requires_grad_(True) for k in PARAMS}
    r = layer_formula(cfg, eps, *(leaves[k] for k in PARAMS), inp["dy"].to(dtype))
    grads = torch.autograd.grad(r["loss"], [leaves[k] for k in PARAMS])
    r["grads"] = {"d" + k: g.detach() for k, g in zip(PARAMS, grads)}
    return r


def build_fixture(cfg):
    eps = noise_draws(cfg)
    seed = cfg["data_seed"]
    for _ in range(1000):
        inp = make_inputs(cfg, seed)
        if noisy_margin(inp, eps, cfg["K"]) >= MARGIN:
            break
        seed += 1
    else:
        raise RuntimeError("no data seed with a routing margin")

    r64 = run_reference(cfg, inp, eps, torch.float64)
    r32 = run_reference(cfg, inp, eps, torch.float32)
    assert torch.equal(r64["ids"], r32["ids"]), "routing differs f32/f64"
    keys = ["y", "weights", "aux", "z", "imp", "load", "loss"]
    pairs = [(k, r64[k], r32[k]) for k in keys] + [(k, r64["grads"][k], r32["grads"][k]) for k in r64["grads"]]
    for k, a, b in pairs:
        a, b = a.detach().double(), b.detach().double()
        diff = float((a - b).abs().max())
        tol = 1e-4 * max(1.0, float(a.abs().max()))
        assert diff <= tol, "%s f32 vs f64 diff %g > %g" % (k, diff, tol)
    # the load loss must matter: some probabilities away from 0 and 1
    assert float(r64["load"]) > 1e-4 and float(r64["grads"]["dwnoise"].abs().max()) > 1e-3

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    tensors = {k: inp[k] for k in PARAMS + ["dy"]}
    tensors["eps"] = eps
    tensors["y"] = f32(r64["y"])
    tensors["topk_ids"] = r64["ids"].to(torch.int32).contiguous()
    tensors["topk_weights"] = f32(r64["weights"])
    # aux, z, importance, load: the stats fields, coefficients included
    tensors["losses"] = f32(torch.stack([r64[k].detach() for k in ["aux", "z", "imp", "load"]]))
    tensors["loss"] = f32(r64["loss"].reshape(1))
    for k, g in r64["grads"].items():
        tensors[k] = f32(g)
    meta = {k: str(cfg[k]) for k in ["N", "C", "F", "E", "K", "seed", "call"]}
    meta.update({k: repr(float(cfg[k])) for k in ["scale", "aux_coef", "z_coef", "importance_coef", "load_coef"]})
    meta.update({"act": "swiglu", "data_seed": str(seed), "generator": GENERATOR,
                 "torch_version": torch.__version__})
    return tensors, meta, r64


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        sys.stderr.write("usage: %s OUTDIR\n" % argv[0])
        return 2
    outdir = argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(1)
    tensors, meta, r64 = build_fixture(CFG)
    nbytes = write_fixture(outdir, CFG["name"], tensors, meta)
    print("%s loss=%.9g load=%.9g imp=%.9g data_seed=%s bytes=%d"
          % (CFG["name"], float(r64["loss"]), float(r64["load"]), float(r64["imp"]), meta["data_seed"], nbytes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
