"""An exported himoe model in plain torch + transformers (remote code, no himoe import).

`himoe export-hf` copies this file into the export. It re-implements himoe's eval-mode
forward: learned positions, pre-LayerNorm blocks, causal attention with a transformers
KV cache, and the mixture-of-experts FFN of every himoe router in its inference form
(no dropout, no balancing losses, no training-only EMA correction). The weight names are
himoe's own (`blocks.0.ffn.experts.w1_EDF`), so the export is a plain copy of the tensors.
The LM head is the token embedding (tied), read straight from `tok_emb.weight`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_himoe import HimoeConfig

# The output field that carries the KV cache: `cache` from transformers 5.24 on (generate()
# reads it from there), `past_key_values` before.
CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
               else "past_key_values")

# --- routers: each maps tokens to k flat expert ids (group * M + expert) and k weights ---
# They compute in fp32 whatever the model dtype, as himoe does. Balancing biases (loss-free
# balancing) change which experts are selected, never the combine weights.


class HierarchicalRouter(nn.Module):
    """Level 1 picks top_k_groups of N groups, each kept group's router picks top_k_experts
    of its M experts; combine weight p1[g] * p2[g, j]."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config = config
        N, M, D = config.num_moes, config.num_experts, config.n_embd
        self.main_weight_ND = nn.Parameter(torch.empty(N, D))
        self.group_weight_NMD = nn.Parameter(torch.empty(N, M, D))
        self.register_buffer("group_bias_N", torch.zeros(N))
        self.register_buffer("expert_bias_E", torch.zeros(N * M))
        # Groups of different sizes: the empty slots of smaller groups are never picked.
        # (A plain list, not a buffer: from_pretrained leaves non-persistent buffers unset.)
        self.sizes = config.group_experts[layer_idx] if config.group_experts else [M] * N
        self.ragged = min(self.sizes) < M

    def forward(self, x_TD):
        cfg = self.config
        N, M = cfg.num_moes, cfg.num_experts
        x32_TD = x_TD.float()
        p1_TN = F.softmax(x32_TD @ self.main_weight_ND.float().t(), dim=-1)
        g_TG = (p1_TN + self.group_bias_N).topk(cfg.top_k_groups, dim=-1).indices
        p1_TG = p1_TN.gather(1, g_TG)
        logits2_TNM = (x32_TD @ self.group_weight_NMD.float().reshape(N * M, -1).t()).view(-1, N, M)
        if self.ragged:
            sizes_N1 = torch.tensor(self.sizes, device=x_TD.device)[:, None]
            empty_NM = torch.arange(M, device=x_TD.device) >= sizes_N1
            logits2_TNM = logits2_TNM.masked_fill(empty_NM, float("-inf"))
        p2_TGM = F.softmax(logits2_TNM.gather(1, g_TG.unsqueeze(-1).expand(-1, -1, M)), dim=-1)
        score_TGM = p2_TGM + self.expert_bias_E.view(N, M)[g_TG]
        if self.ragged:  # an empty slot's p2 is 0, but its bias 0 can beat a negative one
            score_TGM = score_TGM.masked_fill(empty_NM[g_TG], float("-inf"))
        j_TGJ = score_TGM.topk(cfg.top_k_experts, dim=-1).indices
        ids_TK = (g_TG.unsqueeze(-1) * M + j_TGJ).flatten(1)
        weights_TK = (p1_TG.unsqueeze(-1) * p2_TGM.gather(2, j_TGJ)).flatten(1)
        return ids_TK, weights_TK


class GroupedRouter(nn.Module):
    """Hi-MoE: one softmax over all experts, the top top_k_experts inside every group,
    weights renormalised over the chosen experts and scaled by a learned per-expert factor."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E = config.num_moes * config.num_experts
        self.weight_ED = nn.Parameter(torch.empty(E, config.n_embd))
        self.expert_scale_E = nn.Parameter(torch.ones(E))

    def forward(self, x_TD):
        cfg = self.config
        N, M = cfg.num_moes, cfg.num_experts
        pi_TE = F.softmax((x_TD.float() @ self.weight_ED.float().t()) / cfg.router_temp, -1)
        top_TNJ, j_TNJ = pi_TE.view(-1, N, M).topk(cfg.top_k_experts, dim=-1)
        group_N11 = torch.arange(N, device=x_TD.device).view(1, N, 1)
        ids_TK = (group_N11 * M + j_TNJ).flatten(1)
        weights_TK = top_TNJ.flatten(1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True) * self.expert_scale_E[ids_TK]
        return ids_TK, weights_TK


class TopKRouter(nn.Module):
    """Flat top-k over all experts; weights are the probabilities, renormalised if asked."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E = config.num_moes * config.num_experts
        self.weight_ED = nn.Parameter(torch.empty(E, config.n_embd))
        self.register_buffer("expert_bias_E", torch.zeros(E))

    def select(self, scores_TE):
        return scores_TE.topk(self.config.top_k_experts, dim=-1).indices

    def forward(self, x_TD):
        p_TE = F.softmax(x_TD.float() @ self.weight_ED.float().t(), -1)
        ids_TK = self.select(p_TE + self.expert_bias_E)
        weights_TK = p_TE.gather(1, ids_TK)
        if self.config.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return ids_TK, weights_TK


class GroupLimitedRouter(TopKRouter):
    """DeepSeek-V3: a group scores the sum of its two best expert scores; the top
    top_k_experts are chosen among the experts of the top_k_groups best groups."""

    def select(self, scores_TE):
        cfg = self.config
        N, M = cfg.num_moes, cfg.num_experts
        scores_TNM = scores_TE.view(-1, N, M)
        group_score_TN = scores_TNM.topk(min(2, M), dim=-1).values.sum(-1)
        keep_TG = group_score_TN.topk(cfg.top_k_groups, dim=-1).indices
        keep_TN = torch.zeros_like(group_score_TN, dtype=torch.bool).scatter_(1, keep_TG, True)
        masked_TE = scores_TNM.masked_fill(~keep_TN.unsqueeze(-1), float("-inf")).flatten(1)
        return masked_TE.topk(cfg.top_k_experts, dim=-1).indices


ROUTERS = {"hierarchical": HierarchicalRouter, "grouped": GroupedRouter, "topk": TopKRouter,
           "group_limited": GroupLimitedRouter}


def apply_capacity(ids_TK, weights_TK, num_experts, capacity_factor):
    """himoe's capacity limit: an expert keeps its ceil(cf * T * K / E) highest-weight
    assignments (ties: earlier tokens); the rest get id -1 and add nothing."""
    flat_ids_S, flat_w_S = ids_TK.reshape(-1), weights_TK.reshape(-1)
    capacity = math.ceil(capacity_factor * flat_ids_S.numel() / num_experts)
    by_weight_S = flat_w_S.argsort(descending=True, stable=True)
    order_S = by_weight_S[flat_ids_S[by_weight_S].argsort(stable=True)]
    counts_E = torch.bincount(flat_ids_S)
    rank_S = torch.arange(len(order_S), device=ids_TK.device) - (counts_E.cumsum(0) - counts_E)[
        flat_ids_S[order_S]]
    dropped_ids_S = flat_ids_S.clone()
    dropped_ids_S[order_S[rank_S >= capacity]] = -1
    return dropped_ids_S.view_as(ids_TK)


class ExpertBank(nn.Module):
    """E GELU FFNs (D -> F -> D) with biases, stacked as in himoe."""

    def __init__(self, config):
        super().__init__()
        E, D, F_ = config.num_moes * config.num_experts, config.n_embd, config.expert_hidden
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.b1_EF = nn.Parameter(torch.zeros(E, F_))
        self.w2_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.b2_ED = nn.Parameter(torch.zeros(E, D))

    def forward(self, x_TD, ids_TK, weights_TK):
        """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]); id -1 adds nothing."""
        y_TKD = x_TD.new_zeros(*ids_TK.shape, x_TD.shape[1])
        for e in ids_TK.unique().tolist():
            if e < 0:
                continue
            t_S, k_S = (ids_TK == e).nonzero(as_tuple=True)
            h_SF = F.gelu(torch.addmm(self.b1_EF[e], x_TD[t_S], self.w1_EDF[e]))
            y_SD = torch.addmm(self.b2_ED[e], h_SF, self.w2_EFD[e])
            y_TKD[t_S, k_S] = (y_SD * weights_TK[t_S, k_S, None]).to(x_TD.dtype)
        return y_TKD.sum(1)


class MoELayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.router = (HierarchicalRouter(config, layer_idx) if config.router == "hierarchical"
                       else ROUTERS[config.router](config))
        sizes = config.group_experts[layer_idx] if config.group_experts else None
        self.num_real_experts = sum(sizes) if sizes else config.num_moes * config.num_experts
        self.experts = ExpertBank(config)

    def forward(self, x_BTD):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        ids_TK, weights_TK = self.router(x_TD)
        if self.config.capacity_factor > 0:
            ids_TK = apply_capacity(ids_TK, weights_TK, self.num_real_experts,
                                    self.config.capacity_factor)
        return self.experts(x_TD, ids_TK, weights_TK).view(B, T, D)


class DenseFFN(nn.Module):
    """One GELU FFN: the dense baseline (router "dense") and the shared expert."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.expert_hidden
        self.fc1 = nn.Linear(config.n_embd, hidden)
        self.fc2 = nn.Linear(hidden, config.n_embd)

    def forward(self, x_BTD):
        return self.fc2(F.gelu(self.fc1(x_BTD)))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x_BTD, mask_B1TS, past_key_values):
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                                  for t in (q, k, v))
        if past_key_values is not None:
            k_BHTd, v_BHTd = past_key_values.update(k_BHTd, v_BHTd, self.layer_idx)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=mask_B1TS,
            is_causal=mask_B1TS is None and k_BHTd.shape[2] == T and T > 1)
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.ffn = DenseFFN(config) if config.router == "dense" else MoELayer(config, layer_idx)
        shared = getattr(config, "shared_expert", 0)  # exports from before it existed: none
        self.shared_ffn = DenseFFN(config, shared) if shared else None

    def forward(self, x_BTD, mask_B1TS, past_key_values):
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), mask_B1TS, past_key_values)
        h_BTD = self.ln2(x_BTD)
        y_BTD = self.ffn(h_BTD)
        if self.shared_ffn is not None:
            y_BTD = y_BTD + self.shared_ffn(h_BTD)
        return x_BTD + y_BTD


def attention_mask_4d(attention_mask_BS, T, device):
    """Boolean [B, 1, T, S] mask: causal over the S = past + T keys, padded keys hidden.
    A padded query still sees itself, so no row is empty (SDPA would give NaN there)."""
    S = attention_mask_BS.shape[1]
    past = S - T
    causal_TS = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)
    self_TS = torch.zeros(T, S, dtype=torch.bool, device=device)
    self_TS[torch.arange(T, device=device), past + torch.arange(T, device=device)] = True
    keys_B11S = attention_mask_BS.bool()[:, None, None, :]
    return (causal_TS & keys_B11S) | self_TS


class HimoePreTrainedModel(PreTrainedModel):
    config_class = HimoeConfig
    base_model_prefix = "himoe"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: generate() may pass a Cache object

    def _init_weights(self, module):
        """Used for weights a checkpoint lacks and for a model built from a config alone."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (HierarchicalRouter, GroupedRouter, TopKRouter, ExpertBank)):
            for name, p in module.named_parameters(recurse=False):
                if name == "expert_scale_E":
                    nn.init.ones_(p)
                elif name.startswith("b"):  # expert biases
                    nn.init.zeros_(p)
                else:  # gate and expert matrices
                    nn.init.normal_(p, std=0.02)
            for b in module.buffers(recurse=False):  # balancing biases start at zero
                nn.init.zeros_(b)


class HimoeForCausalLM(HimoePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        # transformers >= 5.24 passes the KV cache as `cache`, older releases as
        # `past_key_values`; an ignored cache would restart positions at 0 every step.
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as either cache or past_key_values, not both")
        past_key_values = cache if cache is not None else past_key_values
        x_BTD = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x_BTD.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        if past + T > self.config.block_size:
            raise ValueError(f"{past + T} tokens exceed this model's block_size "
                             f"{self.config.block_size} (learned positions); keep prompt plus "
                             "new tokens within it")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x_BTD.device).unsqueeze(0)
        x_BTD = x_BTD + self.pos_emb(position_ids)
        mask_B1TS = None
        if attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.all():
            mask_B1TS = attention_mask_4d(attention_mask, T, x_BTD.device)
        elif past > 0 and T > 1:  # new tokens see every cached one and each other causally
            mask_B1TS = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(past)
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_B1TS, past_key_values if use_cache else None)
        h_BTD = self.ln_f(x_BTD)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h_BTD = h_BTD[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h_BTD = h_BTD[:, logits_to_keep]
        logits_BTV = F.linear(h_BTD, self.tok_emb.weight)  # tied LM head
        loss = None
        if labels is not None:  # next-token loss; -100 labels are ignored
            loss = F.cross_entropy(logits_BTV[:, :-1].float().reshape(-1, logits_BTV.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV,
                                      **{CACHE_FIELD: past_key_values if use_cache else None})
