"""HiMoEConfig: the card's hyperparameters plus the few this package adds.

One dataclass holds both model shape and training settings, as the card's table does.
`MODEL_FIELDS` names the ones that fix the shape of the weights: those come from a saved
model's config.json on resume and may not be changed by flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from himoe.errors import UserError

ROUTERS = ("hierarchical", "grouped", "topk", "group_limited", "dense")
REG_FORMS = ("l2", "entropy")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZERS = ("char", "bpe")
LOGGERS = ("none", "tensorboard")


@dataclass
class HiMoEConfig:
    # --- model shape (the card's table) ---
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 128
    num_moes: int = 6  # level-1 choices: MoE blocks ("groups")
    num_experts: int = 8  # level-2 choices inside each MoE block
    dropout: float = 0.1
    # --- model shape (ours) ---
    top_k_groups: int = 1
    top_k_experts: int = 1
    ffn_mult: int = 4  # expert hidden width = ffn_mult * n_embd
    router: str = "hierarchical"  # "dense" = one plain FFN per block, the baseline
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes <= cf * T * k / E
    # --- routing losses and the grouped router (all off for the card) ---
    switch_coef: float = 0.0  # Switch load balancing (per level for the hierarchical router)
    z_coef: float = 0.0  # router z-loss
    inter_coef: float = 0.0  # Hi-MoE R_inter, lambda2 (paper: 0.05)
    intra_coef: float = 0.0  # Hi-MoE R_intra, lambda1 (paper: 0.1)
    reg_form: str = "l2"  # "l2" or "entropy" form of R_inter and R_intra
    intra_conditional: bool = False  # R_intra on within-group probabilities
    intra_warmup: int = 0  # steps over which R_intra ramps in from 0 (stage 2 of the paper)
    bias_tau: float = 0.01  # grouped router: logit correction tau * EMA(logits)
    ema_beta: float = 0.9
    router_temp: float = 1.0
    renormalize: bool = False  # topk / group_limited: kept weights sum to 1 (MiniMoE)
    bias_update_rate: float = 0.0  # loss-free balancing step u (DeepSeek-V3: 1e-3); 0 = off
    # The share of the active FFN width (ffn_mult * n_embd) given to a shared expert, a dense
    # FFN that every token runs beside its routed one; the routed experts get the rest.
    shared_fraction: float = 0.0
    expert_hidden: int = 0  # routed expert width; 0: what the shared expert leaves
    # Per layer, the expert count of every group once `himoe experts add` made them differ;
    # None: every group has num_experts. num_experts is then the largest group.
    group_experts: list[list[int]] | None = None
    preset: str = ""  # the --preset this configuration started from, if any
    vocab_size: int = 0  # set from the tokenizer: the rows of the embedding
    tokenizer: str = "char"  # "char" (the card's) or "bpe" (byte-level, saved as tokenizer.json)
    bpe_vocab_size: int = 2048  # BPE target size (flag --vocab_size); vocab_size is the result
    # --- training (the card's table) ---
    batch_size: int = 32
    max_iters: int = 3000
    lr: float = 3e-4
    # --- training (the card's "Training Details") ---
    warmup_iters: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_iters: int = 20
    # --- run ---
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    data_file: str | None = None
    model_dir: str = "model"
    sample_tokens: int = 400
    compile: bool = False  # torch.compile the training forward (attention, norms, residuals)
    log: str = "none"  # "tensorboard": scalars to log_dir (default MODEL_DIR/tb)
    log_dir: str | None = None

    @property
    def shared_hidden(self) -> int:
        """Width of the shared expert (0: none)."""
        return round(self.shared_fraction * self.ffn_mult * self.n_embd)

    @property
    def ffn_hidden(self) -> int:
        """Width of each routed expert (of the one FFN, for the dense baseline)."""
        return self.expert_hidden or self.ffn_mult * self.n_embd - self.shared_hidden

    @property
    def total_experts(self) -> int:
        return self.num_moes * self.num_experts

    def group_sizes(self, layer: int) -> list[int]:
        """How many experts each group of MoE layer `layer` (0-based) has."""
        if self.group_experts is None:
            return [self.num_experts] * self.num_moes
        return list(self.group_experts[layer])

    def real_slots(self, layer: int) -> list[int]:
        """The flat slots g * num_experts + j that hold an expert. In memory every group has
        num_experts slots, so ragged groups leave empty slots that routing never picks."""
        M = self.num_experts
        return [g * M + j for g, n in enumerate(self.group_sizes(layer)) for j in range(n)]

    @property
    def experts_per_token(self) -> int:
        if self.router == "grouped":  # top_k_experts inside every group
            return self.num_moes * self.top_k_experts
        if self.router in ("topk", "group_limited"):  # top_k_experts over all kept experts
            return self.top_k_experts
        return self.top_k_groups * self.top_k_experts

    def validate(self) -> HiMoEConfig:
        positive = ("n_embd", "n_layer", "n_head", "block_size", "num_moes", "num_experts",
                    "top_k_groups", "top_k_experts", "ffn_mult", "batch_size", "max_iters",
                    "eval_interval", "eval_iters")
        if not 0.0 <= self.shared_fraction < 1.0:
            raise UserError(f"--shared_fraction must be in [0, 1) (the shared expert's share "
                            f"of the active FFN width), got {self.shared_fraction}")
        if self.shared_fraction and self.router == "dense":
            raise UserError("--shared_fraction needs a MoE --router; the dense baseline is one "
                            "FFN already: drop the flag")
        if self.expert_hidden < 0:
            raise UserError(f"--expert_hidden must be >= 0 (0: ffn_mult * n_embd), got "
                            f"{self.expert_hidden}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}; "
                            "pick sizes where n_embd % n_head == 0")
        if self.top_k_groups > self.num_moes:
            raise UserError(f"--top_k_groups {self.top_k_groups} is larger than --num_moes "
                            f"{self.num_moes}; use at most {self.num_moes}")
        # How many experts top_k_experts may pick from depends on the router.
        pool = {"topk": self.total_experts,
                "group_limited": self.top_k_groups * self.num_experts}.get(self.router,
                                                                           self.num_experts)
        if self.top_k_experts > pool:
            raise UserError(f"--top_k_experts {self.top_k_experts} is larger than the "
                            f"{pool} experts the {self.router} router picks from; use at most "
                            f"{pool}")
        for name in ("lr", "dropout", "weight_decay", "grad_clip", "min_lr_ratio",
                     "capacity_factor", "switch_coef", "z_coef", "inter_coef", "intra_coef",
                     "bias_tau", "ema_beta", "router_temp", "bias_update_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"--{name} must be a finite non-negative number, got {value}")
        if self.lr == 0:
            raise UserError("--lr must be greater than 0")
        if self.dropout >= 1:
            raise UserError(f"--dropout must be below 1, got {self.dropout}")
        if self.warmup_iters < 0:
            raise UserError(f"--warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.router_temp == 0:
            raise UserError("--router_temp must be greater than 0")
        if self.intra_warmup < 0:
            raise UserError(f"--intra_warmup must be >= 0, got {self.intra_warmup}")
        if self.group_experts is not None:
            self._validate_group_experts()
        choices = {"router": ROUTERS, "device": DEVICES, "dtype": DTYPES, "reg_form": REG_FORMS,
                   "tokenizer": TOKENIZERS, "log": LOGGERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)!r} is not one of "
                                f"{', '.join(allowed)}")
        return self

    def _validate_group_experts(self) -> None:
        sizes = self.group_experts
        if self.router != "hierarchical":
            raise UserError(f"group_experts (groups of different sizes) needs the hierarchical "
                            f"router, not {self.router!r}; restore config.json")
        if not (isinstance(sizes, list) and len(sizes) == self.n_layer and all(
                isinstance(row, list) and len(row) == self.num_moes and
                all(isinstance(n, int) and 1 <= n <= self.num_experts for n in row)
                for row in sizes)):
            raise UserError(f"group_experts must list, for each of the {self.n_layer} layers, "
                            f"the expert count (1-{self.num_experts}) of each of the "
                            f"{self.num_moes} groups; restore config.json")
        if max(max(row) for row in sizes) != self.num_experts:
            raise UserError("num_experts must equal the largest group in group_experts; "
                            "restore config.json")
        if self.top_k_experts > min(min(row) for row in sizes):
            raise UserError(f"--top_k_experts {self.top_k_experts} is larger than the smallest "
                            "group; use at most its size")

    # --- JSON round trip ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HiMoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config.json has unknown keys {unknown}; it was written by a "
                            "newer himoe, upgrade the package")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


MODEL_FIELDS = ("n_embd", "n_layer", "n_head", "block_size", "num_moes", "num_experts",
                "top_k_groups", "top_k_experts", "ffn_mult", "expert_hidden", "shared_fraction",
                "router", "vocab_size", "group_experts", "tokenizer", "bpe_vocab_size")

# Flags whose value only affects this process, never the saved model.
RUN_ONLY_FIELDS = ("device", "dtype", "model_dir", "data_file", "compile", "log", "log_dir")
