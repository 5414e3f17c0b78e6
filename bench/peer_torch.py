#!/usr/bin/python3
"""PyTorch peer for the MoE layer benchmark.

usage: /usr/bin/python3 bench/peer_torch.py [--shape NAME ...] [--pass fwd|fwdbwd]
           [--threads T] [--json] [--reps R] [--warmup W]

The model is Hugging Face's MixtralSparseMoeBlock forward in float32: a
bias-free nn.Linear router, softmax in float32, top-k, renormalisation, a
one-hot expert mask, a Python loop over experts with torch.where and
index_add_. Weights ~ N(0, 0.02^2).

fwd    = forward under torch.no_grad()
fwdbwd = forward with grad + (y * dy).sum().backward() (x requires grad, so dx
         is computed too; grads are set to None before every rep)

GFLOP/s count active expert FLOPs only: fwd = 2*N*K*3*C*F, fwdbwd = 3x that.
With --json one JSON object per line:
  {"shape", "pass", "ms" (median), "ms_min", "gflops", "impl": "torch", "threads"}
"""

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# name: (tokens N, C, F, E, K)
SHAPES = {
    "S1": (4096, 512, 1024, 8, 2),
    "S2": (2048, 1024, 3584, 8, 2),
    "S3-e8": (8192, 256, 256, 8, 2),
    "S3-e64": (8192, 256, 256, 64, 2),
    "S3-e512": (8192, 256, 256, 512, 2),
}


class MixtralBlockSparseTop2MLP(nn.Module):
    def __init__(self, hidden_dim, ffn_dim):
        super().__init__()
        self.w1 = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        current_hidden_states = self.w2(current_hidden_states)
        return current_hidden_states


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, hidden_dim, ffn_dim, num_experts, top_k):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.ffn_dim = ffn_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            [MixtralBlockSparseTop2MLP(hidden_dim, ffn_dim) for _ in range(num_experts)])

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        # router_logits: (batch * sequence_length, n_experts)
        router_logits = self.gate(hidden_states)

        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        # cast back to the input dtype
        routing_weights = routing_weights.to(hidden_states.dtype)

        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim),
            dtype=hidden_states.dtype, device=hidden_states.device)

        # One hot encode the selected experts to create an expert mask;
        # this will be used to easily index which expert is going to be solicited
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)

        # Loop over all available experts in the model and perform the computation on each expert
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])

            # Index the correct hidden states and compute the expert hidden state for
            # the current expert. We need to make sure to multiply the output hidden
            # states by `routing_weights` on the corresponding tokens (top-1 and top-2)
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]

            # However `index_add_` only support torch tensors for indexing so we'll use
            # the `top_x` tensor here.
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


def expert_flops(n, c, f, k, pass_):
    fwd = 2.0 * n * k * 3 * c * f
    return fwd if pass_ == "fwd" else 3.0 * fwd


def bench_shape(name, pass_, reps, warmup):
    n, c, f, e, k = SHAPES[name]
    torch.manual_seed(0)
    model = MixtralSparseMoeBlock(c, f, e, k)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(1, n, c, dtype=torch.float32)
    dy = torch.randn(1, n, c, dtype=torch.float32)

    if pass_ == "fwd":
        model.requires_grad_(False)

        def step():
            with torch.no_grad():
                model(x)
    else:
        x.requires_grad_(True)

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            y, _ = model(x)
            (y * dy).sum().backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    res = {
        "shape": name,
        "pass": pass_,
        "ms": med * 1e3,
        "ms_min": min(times) * 1e3,
        "gflops": expert_flops(n, c, f, k, pass_) / med / 1e9,
        "impl": "torch",
        "threads": torch.get_num_threads(),
    }
    del model, x, dy
    gc.collect()
    return res


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer for the MoE layer benchmark")
    ap.add_argument("--shape", nargs="+", action="extend", choices=list(SHAPES),
                    metavar="NAME", help="shapes to run (%s); default all" % ", ".join(SHAPES))
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwdbwd"], default="fwd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    if a.threads < 1 or a.reps < 1 or a.warmup < 0:
        ap.error("--threads and --reps must be >= 1, --warmup >= 0")

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shapes = a.shape or list(SHAPES)

    if not a.json:
        hdr = "%-8s %-6s %5s %5s %5s %4s %2s %3s %11s %11s %9s" % (
            "shape", "pass", "N", "C", "F", "E", "K", "thr", "ms(median)", "ms(min)", "GFLOP/s")
        print(hdr)
        print("-" * len(hdr))
        sys.stdout.flush()
    for name in shapes:
        r = bench_shape(name, a.pass_, a.reps, a.warmup)
        if a.json:
            print(json.dumps(r))
        else:
            n, c, f, e, k = SHAPES[name]
            print("%-8s %-6s %5d %5d %5d %4d %2d %3d %11.2f %11.2f %9.2f" % (
                name, r["pass"], n, c, f, e, k, r["threads"], r["ms"], r["ms_min"], r["gflops"]))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
