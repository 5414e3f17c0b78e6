#!/usr/bin/python3
"""PyTorch reference fixtures for the C language model (docs/model.md).

usage: /usr/bin/python3 tools/gen_model_fixture.py OUTDIR [NAME ...]

Writes model_tiny_moe.safetensors, model_tiny_mixed.safetensors and
model_tiny_qwen.safetensors (or only the fixtures NAME ...). The model is the
twin in tools/model_twin.py (Hugging Face MixtralForCausalLM style).
model_tiny_qwen adds a gated shared expert (Qwen2-MoE shared_expert_gate),
raw top-k scores (norm_topk_prob false) and the sequence-wise aux loss
(seq_aux: per sequence of T tokens, averaged over the B sequences).
Every number is computed in float64 (model.double()) from float32-
representable weights and stored as float32 (tokens as int32).

Each file holds:
  metadata  config (JSON, every key explicit), seed, generator, torch_version,
            adamw (JSON of the optimiser run), routing_changes, min_margin,
            adamw_min_margin, batch, seq
  <name>            every weight under its docs/model.md name (tied: no
                    lm_head.weight)
  tokens   I32 [B][T+1]   inputs tokens[:, :T], targets tokens[:, 1:]
  logits   [B][T][V]
  loss     [1]  mean CE + sum_l (aux_coef*aux_raw_l + z_coef*z_raw_l) / n_moe
  ce       [1]  mean cross-entropy
  aux      [1]  the summed aux + z contribution (loss - ce)
  grad.<name>     d loss / d weight (zeros for a weight no token reached)
  adamw_losses   [10]  loss before each update (steps 0..9)
  adamw_gradnorm [10]  global gradient L2 norm before clipping
  final.<name>   two weights (model_tiny_qwen: three, with layer 1's
                 shared_expert_gate) after the 10 AdamW steps

Init: weights ~ N(0, 0.02^2), o_proj and w2/down_proj ~ N(0, (0.02/sqrt(2L))^2)
(docs/model.md), except routers ~ N(0, 0.5^2) and norm gains 1 + 0.1*N(0,1),
so that routing and the norms are not trivial; then tokens uniform in [0, V).
All drawn in that order from one torch.Generator seeded with `seed`. The seed
is bumped until, at the initial weights, every MoE layer and token has a gap
of at least MARGIN between consecutive logits among its top K+1 (so float32
routes exactly as float64), and at least RUN_MARGIN at every step of the
AdamW run. During the AdamW run routing may change; the
number of (layer, token) whose top-K set differs between the forward of step 0
and that of step 9 is recorded in routing_changes, and the smallest margin met
along the run in adamw_min_margin.

Checks (assertions): the float32 model's logits match float64 within 1e-4
relative and route identically; an independent formula implementation of
docs/model.md (built on tools/gen_layer_fixtures.py's layer formula) gives
the same logits, losses and gradients; central finite differences of 10
random weights agree with autograd; the AdamW run repeated in float32 routes
identically at every step and matches the float64 losses within 1e-5
relative. Output bytes are deterministic.
"""

import copy
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_twin as mt  # noqa: E402
from gen_layer_fixtures import layer_formula, write_fixture  # noqa: E402

GENERATOR = "tools/gen_model_fixture.py"
MARGIN = 1e-3          # minimum gap between consecutive logits among the top K+1
RUN_MARGIN = 1e-4      # the same, at every step of the AdamW run
ROUTER_STD = 0.5
NORM_GAIN_STD = 0.1
ADAMW = dict(lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0,
             steps=10, schedule="constant", decay="matrices (dim >= 2) only",
             implementation="torch.optim.AdamW + torch.nn.utils.clip_grad_norm_")
FINAL_NAMES = ["model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.block_sparse_moe.gate.weight"]
N_FD = 10

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
            router_aux_loss_coef=0.01, router_z_loss_coef=0.001)

FIXTURES = [
    dict(name="model_tiny_moe", B=2, T=16, seed=5000, config=dict(TINY)),
    dict(name="model_tiny_mixed", B=2, T=16, seed=6000,
         config=dict(TINY, tie_word_embeddings=True, moe_layer_indices=[1],
                     dense_intermediate_size=48, num_experts_per_tok=1,
                     norm_topk_prob=False, router_z_loss_coef=0.0)),
    # Qwen2-MoE style: shared expert with a sigmoid gate, raw top-k scores,
    # and DeepSeek's sequence-wise aux loss.
    dict(name="model_tiny_qwen", B=2, T=16, seed=7000,
         config=dict(TINY, n_shared_experts=1, shared_expert_intermediate_size=16,
                     shared_expert_gate=True, norm_topk_prob=False, seq_aux=True,
                     router_aux_loss_coef=0.01),
         final_names=FINAL_NAMES + ["model.layers.1.block_sparse_moe.shared_expert_gate.weight"]),
]


# ---- helpers ---------------------------------------------------------------------

def routing_margin(router_logits, K):
    """Smallest gap between consecutive sorted logits among the top K+1 of any
    token (covers the K-th/(K+1)-th boundary and the slot order)."""
    E = router_logits.shape[1]
    m = min(K + 1, E)
    if m < 2 or router_logits.shape[0] == 0:
        return float("inf")
    srt, _ = torch.sort(router_logits.detach(), dim=-1, descending=True)
    return float((srt[:, : m - 1] - srt[:, 1:m]).min())


def min_margin(out, K):
    return min([routing_margin(r, K) for r in out.router_logits] or [float("inf")])


def make_model(cfg, seed, B, T):
    """float32 model and tokens, all drawn from one generator seeded with seed."""
    torch.manual_seed(0)   # nn.Linear's own init (overwritten) stays reproducible
    model = mt.MoeForCausalLM(cfg)
    g = mt.init_weights(model, seed=seed, router_std=ROUTER_STD, norm_gain_std=NORM_GAIN_STD)
    tokens = torch.randint(0, model.config["vocab_size"], (B, T + 1), generator=g,
                           dtype=torch.int64)
    return model, tokens


def forward_backward(model, tokens):
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    out.loss.backward()
    mt.fill_missing_grads(model)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out, grads


# ---- independent formula of docs/model.md (cross-check) ---------------------------

def rms(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def rope_formula(x, theta):
    """x [B,T,heads,D]: x'[i] = x[i] cos - x[i+D/2] sin, x'[i+D/2] = x[i+D/2] cos + x[i] sin."""
    B, T, nh, D = x.shape
    half = D // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]   # [T, D/2]
    cos = ang.cos().to(x.dtype)[None, :, None, :]
    sin = ang.sin().to(x.dtype)[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def formula_forward(cfg, W, tokens):
    """docs/model.md written out from its equations, with the MoE layer taken
    from tools/gen_layer_fixtures.py. W maps names to leaf tensors."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    B, T = inp.shape
    C, H, G, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    E, K = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    x = W["model.embed_tokens.weight"][inp.reshape(-1)].reshape(B, T, C)
    aux_total = 0.0
    n_moe = len(cfg["moe_layer_indices"])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        a = rms(x, W[p + "input_layernorm.weight"], eps)
        q = (a @ W[p + "self_attn.q_proj.weight"].T).reshape(B, T, H, D)
        k = (a @ W[p + "self_attn.k_proj.weight"].T).reshape(B, T, G, D)
        v = (a @ W[p + "self_attn.v_proj.weight"].T).reshape(B, T, G, D)
        q, k = rope_formula(q, cfg["rope_theta"]), rope_formula(k, cfg["rope_theta"])
        kv_of_head = torch.arange(H) // (H // G)
        kh, vh = k[:, :, kv_of_head, :], v[:, :, kv_of_head, :]           # [B,T,H,D]
        s = torch.einsum("bthd,bshd->bhts", q, kh) / math.sqrt(D)
        s = s.masked_fill(~causal, float("-inf"))
        pr = torch.softmax(s, dim=-1)
        o = torch.einsum("bhts,bshd->bthd", pr, vh).reshape(B, T, H * D)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        m = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if l in cfg["moe_layer_indices"]:
            q_ = p + "block_sparse_moe."
            stack = lambda w: torch.stack([W[q_ + "experts.%d.%s.weight" % (e, w)] for e in range(E)])
            lcfg = dict(N=B * T, C=C, E=E, K=K, act="swiglu", score=cfg["scoring_func"],
                        renorm=int(cfg["norm_topk_prob"]), scale=cfg["routed_scaling_factor"],
                        aux_coef=cfg["router_aux_loss_coef"], z_coef=cfg["router_z_loss_coef"])
            if cfg.get("seq_aux", False):
                lcfg["aux_seq_len"] = T      # one block per sequence
            mm = m.reshape(B * T, C)
            r = layer_formula(lcfg, mm, W[q_ + "gate.weight"], stack("w1"), stack("w2"),
                              stack("w3"), torch.zeros_like(mm))
            y = r["y"]
            if cfg["n_shared_experts"] > 0:
                se = q_ + "shared_expert."
                sh = (F.silu(mm @ W[se + "gate_proj.weight"].T) * (mm @ W[se + "up_proj.weight"].T)) \
                    @ W[se + "down_proj.weight"].T
                if cfg.get("shared_expert_gate", False):
                    # per token: sh * 1 / (1 + exp(-<x, w>)), w [1][C]
                    zg = (mm * W[q_ + "shared_expert_gate.weight"][0]).sum(-1, keepdim=True)
                    sh = sh / (1.0 + torch.exp(-zg))
                y = y + sh
            x = x + y.reshape(B, T, C)
            aux_total = aux_total + r["loss"] / n_moe     # aux_coef*aux + z_coef*z (dy = 0)
        else:
            x = x + (F.silu(m @ W[p + "mlp.gate_proj.weight"].T) * (m @ W[p + "mlp.up_proj.weight"].T)) \
                @ W[p + "mlp.down_proj.weight"].T
    x = rms(x, W["model.norm.weight"], eps)
    wlm = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    logits = x @ wlm.T
    lp = torch.log_softmax(logits, dim=-1)
    ce = -lp.gather(-1, tgt[..., None]).mean()
    return logits, ce, aux_total, ce + aux_total


def check_formula(cfg, model64, tokens, out64, grads64, name):
    W = {n: p.detach().clone().requires_grad_(True) for n, p in model64.named_parameters()}
    logits, ce, aux, loss = formula_forward(cfg, W, tokens)
    loss.backward()

    def close(tag, a, b, tol=1e-10):
        a, b = a.detach(), b.detach()
        d = float((a - b).abs().max())
        assert d <= tol * max(1.0, float(b.abs().max())), "%s: formula %s differs by %g" % (name, tag, d)

    close("logits", logits, out64.logits)
    close("ce", ce, out64.ce)
    close("aux", torch.as_tensor(aux, dtype=torch.float64), out64.aux)
    close("loss", loss, out64.loss)
    for n, w in W.items():
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        close("grad." + n, g, grads64[n])


# ---- checks ----------------------------------------------------------------------

def check_float32(model32, tokens, out64, name):
    with torch.no_grad():
        out32 = model32(tokens[:, :-1], labels=tokens[:, 1:])
    for l, (a, b) in enumerate(zip(out64.topk_ids, out32.topk_ids)):
        assert torch.equal(a, b), "%s: MoE layer %d routes differently in float32" % (name, l)
    ref = out64.logits.detach()
    d = float((out32.logits.double() - ref).abs().max())
    tol = 1e-4 * float(ref.abs().max())
    assert d <= tol, "%s: float32 logits differ by %g > %g" % (name, d, tol)
    dl = abs(float(out32.loss) - float(out64.loss))
    assert dl <= 1e-4 * abs(float(out64.loss)), "%s: float32 loss differs by %g" % (name, dl)
    return d / float(ref.abs().max())


def check_finite_differences(model64, tokens, grads64, seed, name):
    g = torch.Generator().manual_seed(seed + 777)
    params = dict(model64.named_parameters())
    names = list(params)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    # The routers first (their gradient carries the aux and z losses), then
    # the shared-expert gates, then random tensors; a random element of each.
    picks = [n for n in names if n.endswith("block_sparse_moe.gate.weight")][:N_FD]
    # then the shared-expert gates, if any
    picks += [n for n in names if n.endswith("shared_expert_gate.weight")][:N_FD - len(picks)]
    while len(picks) < N_FD:
        picks.append(names[int(torch.randint(len(names), (1,), generator=g))])
    h = 1e-5
    worst = 0.0
    with torch.no_grad():
        for n in picks:
            p = params[n]
            i = int(torch.randint(p.numel(), (1,), generator=g))
            flat = p.view(-1)
            x0 = float(flat[i])
            flat[i] = x0 + h
            lp = float(model64(inp, labels=tgt).loss)
            flat[i] = x0 - h
            lm = float(model64(inp, labels=tgt).loss)
            flat[i] = x0
            fd = (lp - lm) / (2 * h)
            ad = float(grads64[n].view(-1)[i])
            err = abs(fd - ad)
            assert err <= 2e-9 + 1e-6 * abs(ad), \
                "%s: finite difference %s[%d]: fd %.12g autograd %.12g" % (name, n, i, fd, ad)
            worst = max(worst, err)
    return worst


def topk_sets(out):
    return [torch.sort(ids, dim=-1).values for ids in out.topk_ids]


def adamw_run(model64, tokens):
    """10 AdamW steps on the same batch (in the model's dtype); returns losses,
    grad norms, routing changes (step 0 vs step 9), the smallest margin, the
    top-K sets of every step, and the model."""
    model = copy.deepcopy(model64)
    opt = mt.make_optimizer(model, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    K = model.config["num_experts_per_tok"]
    losses, norms, sets, margins = [], [], [], []
    for step in range(ADAMW["steps"]):
        out, norm = mt.train_step(model, opt, tokens[:, :-1], tokens[:, 1:],
                                  grad_clip=ADAMW["grad_clip"])
        losses.append(float(out.loss))
        norms.append(norm)
        sets.append(topk_sets(out))
        margins.append(min_margin(out, K))
    changes = 0
    for a, b in zip(sets[0], sets[-1]):
        changes += int((a != b).any(dim=-1).sum())
    return losses, norms, changes, min(margins), sets, model


def check_adamw_float32(model32, tokens, losses64, sets64, final64, name, final_names=FINAL_NAMES):
    """The same run in float32 routes identically at every step and tracks
    the float64 losses and final weights (what a float32 C run can match)."""
    losses, _, _, _, sets, final = adamw_run(model32, tokens)
    for step, (a, b) in enumerate(zip(sets64, sets)):
        for l, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), "%s: float32 AdamW step %d layer %d routes differently" % (
                name, step, l)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, losses64))
    assert worst <= 1e-5, "%s: float32 AdamW losses differ by %g relative" % (name, worst)
    p32, p64 = dict(final.named_parameters()), dict(final64.named_parameters())
    for n in final_names:
        d = float((p32[n].detach().double() - p64[n].detach()).abs().max())
        assert d <= 1e-4 * float(p64[n].abs().max()), "%s: float32 final %s differs by %g" % (
            name, n, d)
    return worst


# ---- one fixture -------------------------------------------------------------------

def build_fixture(fx):
    name, B, T = fx["name"], fx["B"], fx["T"]
    cfg = mt.resolve_config(dict(fx["config"], architectures=["MixtralForCausalLM"]))
    K = cfg["num_experts_per_tok"]
    seed = fx["seed"]
    for _ in range(1000):
        model32, tokens = make_model(cfg, seed, B, T)
        model64 = copy.deepcopy(model32).double()
        with torch.no_grad():
            out = model64(tokens[:, :-1], labels=tokens[:, 1:])
        margin = min_margin(out, K)
        if margin >= MARGIN:
            losses, norms, changes, run_margin, sets, final = adamw_run(model64, tokens)
            if run_margin >= RUN_MARGIN:
                break
        seed += 1
    else:
        raise RuntimeError("%s: no seed with routing margin" % name)

    out64, grads64 = forward_backward(model64, tokens)
    rel32 = check_float32(model32, tokens, out64, name)
    check_formula(cfg, model64, tokens, out64, grads64, name)
    fd_err = check_finite_differences(model64, tokens, grads64, seed, name)
    final_names = fx.get("final_names", FINAL_NAMES)
    adamw32 = check_adamw_float32(model32, tokens, losses, sets, final, name, final_names)
    assert abs(losses[0] - float(out64.loss)) <= 1e-12 * abs(losses[0]), name + ": step 0 loss"

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    tensors = {}
    for n, p in model32.named_parameters():
        tensors[n] = f32(p)
        assert torch.equal(p.detach().double(), dict(model64.named_parameters())[n].detach())
    tensors["tokens"] = tokens.to(torch.int32).contiguous()
    tensors["logits"] = f32(out64.logits)
    tensors["loss"] = f32(out64.loss.reshape(1))
    tensors["ce"] = f32(out64.ce.reshape(1))
    tensors["aux"] = f32(out64.aux.reshape(1))
    for n, gr in grads64.items():
        tensors["grad." + n] = f32(gr)
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float64).to(torch.float32)
    tensors["adamw_gradnorm"] = torch.tensor(norms, dtype=torch.float64).to(torch.float32)
    fparams = dict(final.named_parameters())
    for n in final_names:
        tensors["final." + n] = f32(fparams[n])

    meta = {
        "config": json.dumps(cfg),
        "seed": str(seed),
        "generator": GENERATOR,
        "torch_version": torch.__version__,
        "adamw": json.dumps(ADAMW),
        "routing_changes": str(changes),
        "min_margin": repr(margin),
        "adamw_min_margin": repr(run_margin),
        "batch": str(B),
        "seq": str(T),
        "init": json.dumps(dict(initializer_range=cfg["initializer_range"],
                                scaled="o_proj, w2, down_proj: initializer_range/sqrt(2L)",
                                router_std=ROUTER_STD, norm_gain="1 + %g*N(0,1)" % NORM_GAIN_STD,
                                order="named_parameters order, then tokens; torch.Generator, float32")),
    }
    info = dict(seed=seed, margin=margin, run_margin=run_margin, changes=changes,
                loss=float(out64.loss), ce=float(out64.ce), aux=float(out64.aux),
                losses=losses, norms=norms, rel32=rel32, fd_err=fd_err, adamw32=adamw32)
    return tensors, meta, info


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        sys.stderr.write("usage: %s OUTDIR [NAME ...]\n" % argv[0])
        return 2
    outdir = argv[1]
    names = argv[2:]
    unknown = sorted(set(names) - {fx["name"] for fx in FIXTURES})
    if unknown:
        sys.stderr.write("unknown fixture(s): %s\n" % " ".join(unknown))
        return 2
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(1)
    total = 0
    for fx in FIXTURES:
        if names and fx["name"] not in names:
            continue
        tensors, meta, info = build_fixture(fx)
        nbytes = write_fixture(outdir, fx["name"], tensors, meta)
        total += nbytes
        print("%-18s seed=%s bytes=%d loss=%.9g ce=%.9g aux=%.9g margin=%.3g run_margin=%.3g "
              "routing_changes=%d f32_rel=%.2g fd_err=%.2g f32_adamw_rel=%.2g"
              % (fx["name"], meta["seed"], nbytes, info["loss"], info["ce"], info["aux"],
                 info["margin"], info["run_margin"], info["changes"], info["rel32"], info["fd_err"], info["adamw32"]))
        print("  adamw_losses   " + " ".join("%.6f" % v for v in info["losses"]))
        print("  adamw_gradnorm " + " ".join("%.6f" % v for v in info["norms"]))
    print("total %d bytes in %s" % (total, outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
