#!/usr/bin/python3
"""PyTorch twin of the language model in docs/model.md (importable module).

Written the way Hugging Face writes MixtralForCausalLM: an RMSNorm module,
rotary embeddings with rotate_half, attention with repeat_kv for grouped-query
heads, the MoE block as MixtralSparseMoeBlock (router linear, scores in fp32,
top-k, optional renormalisation, routed_scaling_factor, a loop over experts
with index_add_), dense layers as the Llama MLP (gate/up/down, SiLU) and an
optional tied lm_head. Differences from Hugging Face, all from docs/model.md
and docs/layer.md:

  - top-k compares router logits, and equal logits pick the lower expert id
    (a stable descending sort; torch.topk guarantees no tie order);
  - scores may be sigmoid (scoring_func), with route scale
    (routed_scaling_factor) and an optional dense shared expert;
  - optional Qwen2-MoE shared-expert gate (shared_expert_gate): the shared
    output is multiplied per token by sigmoid(x . w), w = the [1][C]
    block_sparse_moe.shared_expert_gate.weight, x the same normed input;
  - the auxiliary losses are per MoE layer, over that layer's N = B*T tokens:
        aux_raw = E * sum_i f_i P_i,  f_i = count_i / (N*K) (all K slots,
                  no gradient), P_i = mean_t q[t,i], q = softmax or
                  sigmoid / sum sigmoid
        z_raw   = mean_t logsumexp(logits_t)^2
    or, with seq_aux (DeepSeek's sequence-wise balance loss), aux_raw is
    that formula on each sequence's T tokens (f_i = count_i / (T*K)),
    averaged over the B sequences; and the objective is
        loss = mean CE + sum_l (aux_coef*aux_raw_l + z_coef*z_raw_l) / n_moe;
  - "fp32" computations (RMSNorm, attention softmax, router scores) run in
    float64 when the model is float64 (model.double()), so a float64 twin is
    a float64 reference throughout.

state_dict() keys are exactly the parameter names of docs/model.md. When
tie_word_embeddings is set there is no lm_head module (and no lm_head.weight):
the logits use model.embed_tokens.weight.

Usage:
    from model_twin import MoeForCausalLM, resolve_config, init_weights, \
        make_optimizer, train_step
    cfg = resolve_config(json.load(open("config.json")))
    model = MoeForCausalLM(cfg)
    init_weights(model, seed=1)
    out = model(tokens[:, :-1], labels=tokens[:, 1:])   # out.loss, out.logits
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---- configuration -------------------------------------------------------------

REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "num_local_experts")

# Every key of docs/model.md, in the order of its table.
CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rms_norm_eps", "tie_word_embeddings", "num_local_experts",
    "num_experts_per_tok", "norm_topk_prob", "scoring_func", "routed_scaling_factor",
    "router_aux_loss_coef", "router_z_loss_coef", "moe_layer_indices",
    "dense_intermediate_size", "n_shared_experts", "shared_expert_intermediate_size",
    "initializer_range",
)

# Optional boolean keys of the C config (include/moe.h), default false. They
# appear in a resolved config only when given, so configs without them
# resolve (and serialise) exactly as before.
OPTIONAL_BOOL_KEYS = ("shared_expert_gate", "seq_aux")


def resolve_config(cfg):
    """A copy of cfg with every key of docs/model.md explicit (defaults applied)
    and validated. Unknown keys are dropped, except "architectures", which is
    kept (config.json carries it)."""
    for k in REQUIRED_KEYS:
        if k not in cfg:
            raise ValueError("config: missing required key %r" % k)
    c = {}
    c["vocab_size"] = int(cfg.get("vocab_size", 4096))
    c["hidden_size"] = int(cfg["hidden_size"])
    c["intermediate_size"] = int(cfg["intermediate_size"])
    c["num_hidden_layers"] = int(cfg["num_hidden_layers"])
    c["num_attention_heads"] = int(cfg["num_attention_heads"])
    c["num_key_value_heads"] = int(cfg.get("num_key_value_heads", c["num_attention_heads"]))
    hd = cfg.get("head_dim")
    c["head_dim"] = int(hd) if hd is not None else c["hidden_size"] // max(c["num_attention_heads"], 1)
    c["max_position_embeddings"] = int(cfg["max_position_embeddings"])
    c["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    c["rms_norm_eps"] = float(cfg.get("rms_norm_eps", 1e-5))
    c["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    c["num_local_experts"] = int(cfg["num_local_experts"])
    c["num_experts_per_tok"] = int(cfg.get("num_experts_per_tok", 2))
    c["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", True))
    c["scoring_func"] = str(cfg.get("scoring_func", "softmax"))
    c["routed_scaling_factor"] = float(cfg.get("routed_scaling_factor", 1.0))
    c["router_aux_loss_coef"] = float(cfg.get("router_aux_loss_coef", 0.01))
    c["router_z_loss_coef"] = float(cfg.get("router_z_loss_coef", 0.001))
    L, E, K = c["num_hidden_layers"], c["num_local_experts"], c["num_experts_per_tok"]
    mli = cfg.get("moe_layer_indices")
    if mli is None:
        mli = list(range(L)) if E > 0 else []
    c["moe_layer_indices"] = sorted(int(i) for i in mli)
    dis = cfg.get("dense_intermediate_size")
    c["dense_intermediate_size"] = int(dis) if dis is not None else K * c["intermediate_size"]
    c["n_shared_experts"] = int(cfg.get("n_shared_experts", 0))
    sis = cfg.get("shared_expert_intermediate_size")
    c["shared_expert_intermediate_size"] = int(sis) if sis is not None else c["intermediate_size"]
    c["initializer_range"] = float(cfg.get("initializer_range", 0.02))
    for k in OPTIONAL_BOOL_KEYS:
        if k in cfg:
            c[k] = bool(cfg[k])

    def bad(msg):
        raise ValueError("config: " + msg)

    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if c[k] <= 0:
            bad("%s must be > 0" % k)
    if c["num_attention_heads"] % c["num_key_value_heads"]:
        bad("num_attention_heads %% num_key_value_heads != 0")
    if c["head_dim"] % 2:
        bad("head_dim must be even (rotary pairs i, i + D/2)")
    if E < 0:
        bad("num_local_experts must be >= 0")
    if len(set(c["moe_layer_indices"])) != len(c["moe_layer_indices"]):
        bad("moe_layer_indices has duplicates")
    if any(i < 0 or i >= L for i in c["moe_layer_indices"]):
        bad("moe_layer_indices out of range")
    if E == 0 and c["moe_layer_indices"]:
        bad("moe_layer_indices with num_local_experts = 0")
    if E > 0:
        if not (1 <= K <= E):
            bad("num_experts_per_tok must be in [1, num_local_experts]")
        if c["intermediate_size"] <= 0:
            bad("intermediate_size must be > 0")
    if len(c["moe_layer_indices"]) < L and c["dense_intermediate_size"] <= 0:
        bad("dense_intermediate_size must be > 0")
    if c["scoring_func"] not in ("softmax", "sigmoid"):
        bad("scoring_func must be softmax or sigmoid")
    if c["n_shared_experts"] < 0 or (c["n_shared_experts"] > 0
                                     and c["shared_expert_intermediate_size"] <= 0):
        bad("bad shared expert sizes")
    if c.get("shared_expert_gate") and c["n_shared_experts"] == 0:
        bad("shared_expert_gate needs n_shared_experts > 0")
    for k in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "router_aux_loss_coef",
              "router_z_loss_coef", "initializer_range"):
        if not math.isfinite(c[k]):
            bad("%s must be finite" % k)
    if "architectures" in cfg:
        c["architectures"] = list(cfg["architectures"])
    return c


def _compute_dtype(dtype):
    """The "fp32" of docs/model.md: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


# ---- modules ---------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(_compute_dtype(input_dtype))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """inv_freq_i = theta^(-2i/D), angle = pos * inv_freq_i; cos/sin are built
    in float64 and cast to the activations' dtype (no buffers, so nothing in
    state_dict)."""

    def __init__(self, dim, max_position_embeddings, base=10000.0):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base

    def forward(self, x, seq_len):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
        t = torch.arange(seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)                       # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                # [T, D]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos = cos[None, None, :, :]   # [1, 1, T, D]
    sin = sin[None, None, :, :]
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states, n_rep):
    """[B, G, T, D] -> [B, G*n_rep, T, D]; query head h reads kv head h // n_rep."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(
        batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden_size = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = cfg["head_dim"]
        self.num_key_value_heads = cfg["num_key_value_heads"]
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg["max_position_embeddings"],
                                          base=cfg["rope_theta"])

    def forward(self, hidden_states):
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)

        query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = key_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)

        cos, sin = self.rotary_emb(value_states, seq_len=q_len)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)

        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
        causal = torch.triu(torch.ones(q_len, q_len, dtype=torch.bool), diagonal=1)
        attn_weights = attn_weights.masked_fill(causal, torch.finfo(attn_weights.dtype).min)
        attn_weights = F.softmax(attn_weights, dim=-1,
                                 dtype=_compute_dtype(query_states.dtype)).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states)   # [B, H, T, D]

        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(attn_output)


class MLP(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BlockSparseTop2MLP(nn.Module):
    """One Mixtral expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden_dim, ffn_dim):
        super().__init__()
        self.w1 = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        return self.w2(current_hidden_states)


def topk_by_logit(router_logits, k):
    """Top-k expert ids by logit, decreasing; equal logits -> lower id first."""
    _, idx = torch.sort(router_logits.detach(), dim=-1, descending=True, stable=True)
    return idx[:, :k]


class SparseMoeBlock(nn.Module):
    """Hugging Face's MixtralSparseMoeBlock, with the options of docs/layer.md
    (plus Qwen2MoeSparseMoeBlock's shared_expert_gate and a per-sequence aux
    loss). forward returns (y, router_logits) and leaves the raw auxiliary losses of
    this call in self.aux_raw, self.z_raw and the chosen ids in self.topk_ids."""

    def __init__(self, cfg):
        super().__init__()
        self.hidden_dim = cfg["hidden_size"]
        self.ffn_dim = cfg["intermediate_size"]
        self.num_experts = cfg["num_local_experts"]
        self.top_k = cfg["num_experts_per_tok"]
        self.norm_topk_prob = cfg["norm_topk_prob"]
        self.scoring_func = cfg["scoring_func"]
        self.routed_scaling_factor = cfg["routed_scaling_factor"]
        self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [BlockSparseTop2MLP(self.hidden_dim, self.ffn_dim) for _ in range(self.num_experts)])
        if cfg["n_shared_experts"] > 0:
            # One dense SwiGLU of n_shared_experts * shared_expert_intermediate_size
            # (n shared experts of that size, fused, as DeepSeek does).
            self.shared_expert = MLP(self.hidden_dim,
                                     cfg["n_shared_experts"] * cfg["shared_expert_intermediate_size"])
        else:
            self.shared_expert = None
        if cfg.get("shared_expert_gate", False):
            # Qwen2MoeSparseMoeBlock: shared output * sigmoid(shared_expert_gate(x)).
            self.shared_expert_gate = nn.Linear(self.hidden_dim, 1, bias=False)
        else:
            self.shared_expert_gate = None
        self.seq_aux = bool(cfg.get("seq_aux", False))
        self.aux_raw = None
        self.z_raw = None
        self.topk_ids = None

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        n_tokens = hidden_states.shape[0]
        # router_logits: (batch * sequence_length, n_experts)
        router_logits = self.gate(hidden_states)
        score_dtype = _compute_dtype(hidden_states.dtype)

        if self.scoring_func == "softmax":
            scores = F.softmax(router_logits, dim=1, dtype=score_dtype)
            q = scores
        else:
            scores = torch.sigmoid(router_logits.to(score_dtype))
            q = scores / scores.sum(dim=-1, keepdim=True)
        selected_experts = topk_by_logit(router_logits, self.top_k)       # [N, K]
        routing_weights = scores.gather(1, selected_experts)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights * self.routed_scaling_factor
        # cast back to the input dtype
        routing_weights = routing_weights.to(hidden_states.dtype)

        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim),
            dtype=hidden_states.dtype, device=hidden_states.device)

        # One hot encode the selected experts to create an expert mask
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)

        # Loop over all available experts in the model and perform the computation on each expert
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.numel() == 0:
                continue
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))

        if self.shared_expert is not None:
            shared_expert_output = self.shared_expert(hidden_states)
            if self.shared_expert_gate is not None:
                shared_expert_output = torch.sigmoid(self.shared_expert_gate(hidden_states)) \
                    * shared_expert_output
            final_hidden_states = final_hidden_states + shared_expert_output

        # Auxiliary losses (docs/layer.md), over this call's N tokens.
        if n_tokens > 0 and self.seq_aux:
            # Sequence-wise: the same formula on each sequence of T tokens
            # (T*K slots), averaged over the B sequences.
            per_seq = []
            for b in range(batch_size):
                rows = slice(b * sequence_length, (b + 1) * sequence_length)
                counts = torch.bincount(selected_experts[rows].reshape(-1), minlength=self.num_experts)
                f = counts.to(score_dtype) / (sequence_length * self.top_k)   # no gradient
                P = q[rows].mean(0)
                per_seq.append(self.num_experts * (f * P).sum())
            self.aux_raw = torch.stack(per_seq).mean()
            lse = torch.logsumexp(router_logits.to(score_dtype), dim=-1)
            self.z_raw = (lse ** 2).mean()
        elif n_tokens > 0:
            counts = torch.bincount(selected_experts.reshape(-1), minlength=self.num_experts)
            f = counts.to(score_dtype) / (n_tokens * self.top_k)           # no gradient
            P = q.mean(0)
            self.aux_raw = self.num_experts * (f * P).sum()
            lse = torch.logsumexp(router_logits.to(score_dtype), dim=-1)
            self.z_raw = (lse ** 2).mean()
        else:
            self.aux_raw = router_logits.new_zeros((), dtype=score_dtype)
            self.z_raw = router_logits.new_zeros((), dtype=score_dtype)
        self.topk_ids = selected_experts

        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.is_moe = layer_idx in cfg["moe_layer_indices"]
        self.self_attn = Attention(cfg)
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(cfg)
        else:
            self.mlp = MLP(cfg["hidden_size"], cfg["dense_intermediate_size"])
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps=cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps=cfg["rms_norm_eps"])

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if self.is_moe:
            hidden_states, router_logits = self.block_sparse_moe(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, router_logits


class MoeModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, l) for l in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], eps=cfg["rms_norm_eps"])

    def forward(self, input_ids):
        hidden_states = self.embed_tokens(input_ids)
        all_router_logits = []
        for layer in self.layers:
            hidden_states, router_logits = layer(hidden_states)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        return self.norm(hidden_states), all_router_logits


class ModelOutput:
    """logits [B,T,V]; with labels: loss (full objective), ce, aux (the summed
    aux + z contribution); per MoE layer (in layer order): router_logits [N,E],
    topk_ids [N,K], aux_raw, z_raw."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class MoeForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.model = MoeModel(cfg)
        if cfg["tie_word_embeddings"]:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.moe_blocks = [layer.block_sparse_moe for layer in self.model.layers if layer.is_moe]

    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, labels=None):
        T = input_ids.shape[-1]
        if T > self.config["max_position_embeddings"]:
            raise ValueError("sequence length %d > max_position_embeddings %d"
                             % (T, self.config["max_position_embeddings"]))
        hidden_states, router_logits = self.model(input_ids)
        logits = F.linear(hidden_states, self.lm_head_weight())
        out = ModelOutput(logits=logits, router_logits=router_logits,
                          topk_ids=[b.topk_ids for b in self.moe_blocks],
                          aux_raw=[b.aux_raw for b in self.moe_blocks],
                          z_raw=[b.z_raw for b in self.moe_blocks],
                          loss=None, ce=None, aux=None)
        if labels is not None:
            V = logits.shape[-1]
            ce = F.cross_entropy(logits.reshape(-1, V).to(_compute_dtype(logits.dtype)),
                                 labels.reshape(-1))
            aux = ce.new_zeros(())
            n_moe = len(self.moe_blocks)
            for b in self.moe_blocks:
                aux = aux + (self.config["router_aux_loss_coef"] * b.aux_raw
                             + self.config["router_z_loss_coef"] * b.z_raw).to(aux.dtype)
            if n_moe:
                aux = aux / n_moe
            out.ce = ce
            out.aux = aux
            out.loss = ce + aux
        return out


# ---- initialisation --------------------------------------------------------------

SCALED_SUFFIXES = ("o_proj.weight", ".w2.weight", "down_proj.weight")


@torch.no_grad()
def init_weights(model, seed=0, generator=None, router_std=None, norm_gain_std=0.0):
    """docs/model.md's init, drawn in named_parameters() order from a seeded CPU
    torch.Generator in float32: matrices ~ N(0, r^2), o_proj / w2 / down_proj
    ~ N(0, (r/sqrt(2L))^2), norm gains 1. Fixture options: router_std
    replaces r for the routers (block_sparse_moe.gate.weight), and
    norm_gain_std > 0 draws gains as 1 + norm_gain_std * N(0,1). Values are
    float32-representable whatever the model dtype. Returns the generator
    (to draw more from the same stream)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    cfg = model.config
    r = cfg["initializer_range"]
    scaled = r / math.sqrt(2 * cfg["num_hidden_layers"])
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if norm_gain_std:
                t = 1.0 + torch.randn(p.shape, generator=g, dtype=torch.float32) * norm_gain_std
            else:
                t = torch.ones(p.shape, dtype=torch.float32)
        else:
            if router_std is not None and name.endswith("block_sparse_moe.gate.weight"):
                std = router_std
            elif name.endswith(SCALED_SUFFIXES):
                std = scaled
            else:
                std = r
            t = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        p.copy_(t.to(torch.float32))
    return g


# ---- optimiser -------------------------------------------------------------------

def param_groups(model, weight_decay):
    """AdamW groups: decay for matrices (dim >= 2), none for 1-D norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, foreach=False)


def lr_at(step, lr, warmup_steps=0, max_steps=0, min_lr=0.0):
    """docs/model.md schedule: linear warm-up 0 -> lr over warmup_steps, then
    cosine to min_lr at max_steps (lr constant when max_steps <= warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * step / warmup_steps
    if max_steps <= warmup_steps:
        return lr
    t = min(1.0, (step - warmup_steps) / float(max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def fill_missing_grads(model):
    """Zero gradients for parameters autograd did not reach (an expert no
    token chose), so AdamW still updates them (moments decay, weight decay
    applies), as a C implementation with zeroed gradient arrays does;
    torch.optim.AdamW skips parameters whose .grad is None."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def train_step(model, optimizer, input_ids, labels, grad_clip=1.0, lr=None):
    """One step: forward, backward, clip to the global norm, AdamW update.
    Returns (output before the update, grad norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids, labels=labels)
    out.loss.backward()
    fill_missing_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    return out, float(norm)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
