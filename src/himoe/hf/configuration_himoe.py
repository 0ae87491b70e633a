"""The transformers configuration of an exported himoe model (remote code, no himoe import).

`himoe export-hf` copies this file next to config.json, which names it in its auto_map, so
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` builds HimoeConfig from it.
"""

from transformers import PretrainedConfig


class HimoeConfig(PretrainedConfig):
    model_type = "himoe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # The standard names that transformers' generation and cache code read.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(self, vocab_size=65, n_embd=256, n_layer=2, n_head=4, block_size=128,
                 num_moes=6, num_experts=8, top_k_groups=1, top_k_experts=1,
                 expert_hidden=1024, shared_expert=0, router="hierarchical", renormalize=False,
                 router_temp=1.0, capacity_factor=0.0, group_experts=None, layer_norm_eps=1e-5,
                 tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.block_size = block_size
        self.num_moes = num_moes  # level-1 choices (groups)
        self.num_experts = num_experts  # level-2 choices per group
        self.top_k_groups = top_k_groups
        self.top_k_experts = top_k_experts
        self.expert_hidden = expert_hidden  # width of each expert's (or the dense) FFN
        self.shared_expert = shared_expert  # width of the FFN beside the routed experts, 0: none
        self.router = router  # hierarchical, grouped, topk, group_limited or dense
        self.renormalize = renormalize  # topk / group_limited: kept weights sum to 1
        self.router_temp = router_temp  # grouped router's softmax temperature
        self.capacity_factor = capacity_factor  # 0: dropless
        self.group_experts = group_experts  # per layer, each group's expert count, if they differ
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
