#!/usr/bin/python3
"""PyTorch peer for the training benchmark: steps of the model twin.

usage: /usr/bin/python3 bench/peer_train_torch.py --config FILE.json
           [--batch B] [--seq T] [--steps S] [--warmup W] [--threads T] [--json]
           [--seed N]

The model is tools/model_twin.py (the Hugging Face MixtralForCausalLM style
twin of docs/model.md) in float32 on the CPU, initialised as docs/model.md
says (seeded). A step is: zero_grad, forward with the full objective (CE +
router aux/z losses), backward, clip_grad_norm_ to 1.0, AdamW (lr 3e-3,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only). The batch
is B random sequences of T+1 tokens, drawn once (inputs tokens[:, :T],
targets tokens[:, 1:]); the same batch every step.

W warm-up steps are run untimed, then S timed ones. Reported: the median
ms/step, tokens/s = B*T / median step time, the parameter count and the peak
RSS (getrusage ru_maxrss) of the process. With --json one JSON object:
  {"impl": "torch", "tokens_per_s", "ms_per_step", "params", "peak_rss_mb",
   "ms_min", "threads", "batch", "seq", "steps", "loss_first", "loss_last"}
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import model_twin as mt  # noqa: E402

LR, BETAS, EPS, WD, CLIP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer: training steps of the model twin")
    ap.add_argument("--config", required=True, help="config.json with the keys of docs/model.md")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object")
    a = ap.parse_args()
    if a.batch < 1 or a.seq < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--batch, --seq, --steps and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(a.threads)
    with open(a.config) as f:
        cfg = mt.resolve_config(json.load(f))
    if a.seq > cfg["max_position_embeddings"]:
        ap.error("--seq %d > max_position_embeddings %d" % (a.seq, cfg["max_position_embeddings"]))

    torch.manual_seed(a.seed)
    model = mt.MoeForCausalLM(cfg)
    g = mt.init_weights(model, seed=a.seed)
    tokens = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq + 1), generator=g)
    inp, tgt = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    opt = mt.make_optimizer(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    losses = []
    for _ in range(a.warmup):
        out, _ = mt.train_step(model, opt, inp, tgt, grad_clip=CLIP)
        losses.append(float(out.loss))
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        out, _ = mt.train_step(model, opt, inp, tgt, grad_clip=CLIP)
        loss = float(out.loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)

    med = statistics.median(times)
    res = {
        "impl": "torch",
        "tokens_per_s": a.batch * a.seq / med,
        "ms_per_step": med * 1e3,
        "params": mt.count_params(model),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "ms_min": min(times) * 1e3,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if a.json:
        print(json.dumps(res))
    else:
        print("torch twin: %d params, B=%d T=%d, %d threads" % (res["params"], a.batch, a.seq,
                                                               res["threads"]))
        print("  %.1f ms/step (median of %d, min %.1f), %.0f tokens/s, peak RSS %.0f MiB"
              % (res["ms_per_step"], a.steps, res["ms_min"], res["tokens_per_s"], res["peak_rss_mb"]))
        print("  loss %.4f -> %.4f" % (res["loss_first"], res["loss_last"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
