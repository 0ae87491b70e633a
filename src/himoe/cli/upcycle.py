"""`himoe upcycle`: a MoE model that starts as a saved dense one (himoe.edit.upcycle)."""

from __future__ import annotations

from pathlib import Path

from himoe.cli.options import add_model_dir, seed_flag
from himoe.cli.train import add_config_flags, given_settings

# The MoE's shape and routing; the backbone's shape and training come from the dense
# model's config.json.
FLAGS = ("router", "num_moes", "num_experts", "top_k_groups", "top_k_experts",
         "shared_fraction", "renormalize", "capacity_factor", "switch_coef", "z_coef",
         "bias_update_rate", "bias_rate_schedule", "seq_switch_coef", "router_jitter",
         "noisy_gating", "importance_coef", "load_coef")

DESCRIPTION = (
    "Writes a MoE whose backbone is the dense model's and whose experts start from each "
    "layer's dense FFN, split by hidden unit: the shared expert takes the first "
    "shared_hidden units (and the output bias), every routed expert a copy of the other "
    "units with its output layer scaled by 1/w0, where w0 is what a token's combine weights "
    "sum to once the gates are zero (uniform routing: 1/(num_moes*num_experts) for the "
    "hierarchical top-1/top-1 router). At step 0 the MoE then computes what the dense model "
    "computes, to rounding. --noise S multiplies each routed expert's weights by 1 + S*u, u "
    "uniform in [-1, 1], so the copies differ; each layer's output then stays within "
    "S*|W2|*(1.13*(1+S)*(|W1||h|+|b1|) + |gelu(W1 h+b1)|) of the dense FFN's (docs/experts.md: "
    "Upcycling a dense model). The tokenizer and training settings come with the dense "
    "model; train_state.pt is a new run's at step 0, so `himoe train --model_dir OUT --resume "
    "--max_iters K` trains it.")


def cmd_upcycle(args) -> int:
    from himoe.edit.upcycle import upcycle

    print(upcycle(Path(args.from_dir), Path(args.model_dir), given_settings(args), args.noise,
                  args.seed, args.force))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="a MoE that starts as a dense model: every expert a copy "
                                       "of its layer's FFN", description=DESCRIPTION)
    p.add_argument("--from", dest="from_dir", required=True, metavar="DENSE_DIR",
                   help="a model directory `himoe train --router dense` wrote")
    add_model_dir(p, required=True, help="where the MoE goes (new or empty, or --force)")
    add_config_flags(p, only=FLAGS)
    p.add_argument("--noise", type=float, default=0.0,
                   help="relative noise on each routed expert's weights, to break the copies' "
                        "symmetry (default: 0, exact)")
    p.add_argument("--seed", type=seed_flag, default=0, help="seed of the noise")
    p.add_argument("--force", action="store_true",
                   help="replace the himoe model already in --model_dir (a folder of other "
                        "files is never written to)")
    p.set_defaults(func=cmd_upcycle)
