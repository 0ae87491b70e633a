"""`himoe train`: one flag per HiMoEConfig field, and the parallel modes' flags."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from himoe.cli.presets import PRESETS, preset_values
from himoe.config import (
    DEVICES,
    DTYPES,
    LOGGERS,
    MODEL_FIELDS,
    REG_FORMS,
    TOKENIZERS,
    HiMoEConfig,
)
from himoe.errors import UserError
from himoe.model.routers.registry import router_help, router_names

CHOICES = {"device": DEVICES, "dtype": DTYPES, "reg_form": REG_FORMS,
           "preset": tuple(PRESETS), "tokenizer": TOKENIZERS, "log": LOGGERS}
# The BPE target size takes the natural flag; the config's vocab_size is what the trained
# tokenizer has (the embedding's rows) and is never a flag.
ALIASES = {"bpe_vocab_size": ["--vocab_size", "--vocab-size"]}
HELP = {
    "n_embd": "embedding / hidden dimension", "n_layer": "number of Transformer layers",
    "n_head": "attention heads", "block_size": "context window (tokens)",
    "num_moes": "level-1 choices (MoE blocks)", "num_experts": "level-2 choices per MoE block",
    "dropout": "dropout rate", "top_k_groups": "MoE blocks chosen per token (level 1)",
    "top_k_experts": "experts chosen per chosen block (level 2)",
    "ffn_mult": "expert hidden width as a multiple of n_embd",
    "capacity_factor": "0 = dropless; else an expert keeps its cf*T*k/E highest-weight tokens",
    "batch_size": "training batch size", "max_iters": "training steps",
    "lr": "peak learning rate", "warmup_iters": "linear warm-up steps",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "weight_decay": "AdamW weight decay on matrices", "grad_clip": "gradient-norm clip",
    "eval_interval": "evaluate and save every this many steps",
    "eval_iters": "validation batches per evaluation", "seed": "random seed",
    "device": "auto, cpu or cuda", "dtype": "compute dtype (auto: bfloat16 on CUDA, else float32)",
    "data_file": "training corpus: a UTF-8 text file, a directory or a glob of them, or a "
                 "directory `himoe prepare` wrote (its tokenizer is used) (default: the "
                 "shipped hamlet.txt)",
    "tokenizer": "char (one token per character, the card's) or bpe (byte-level BPE trained "
                 "on the corpus, saved as tokenizer.json)",
    "bpe_vocab_size": "--tokenizer bpe: target vocabulary size (the model gets the size the "
                      "trained tokenizer has)",
    "log": "tensorboard: write TensorBoard scalars (needs pip install 'himoe[tensorboard]')",
    "log_dir": "TensorBoard directory (default: MODEL_DIR/tb)",
    "model_dir": "where the modular checkpoint goes", "sample_tokens": "length of sample.txt",
    "preset": "routing and losses of a source design (README: Presets); flags override it",
    "renormalize": "topk / group_limited: renormalise the kept weights to sum to 1",
    "bias_update_rate": "loss-free balancing: selection-bias step per optimiser step (0 = off)",
    "expert_hidden": "routed expert width (0: ffn_mult * n_embd less the shared expert's)",
    "shared_fraction": "share of the active FFN width (ffn_mult * n_embd) given to a shared "
                       "expert that every token runs beside its routed one (0: none)",
    "compile": "true: torch.compile the training forward (slow start, faster steps)",
    "switch_coef": "Switch load-balancing loss coefficient", "z_coef": "router z-loss coefficient",
    "inter_coef": "Hi-MoE inter-group balancing (lambda2)",
    "intra_coef": "Hi-MoE intra-group specialisation (lambda1)",
    "reg_form": "l2 or entropy form of the Hi-MoE terms",
    "intra_conditional": "true: R_intra on within-group probabilities",
    "intra_warmup": "steps over which R_intra ramps in",
    "bias_tau": "grouped router: tau of the logit-EMA correction",
    "ema_beta": "grouped router: EMA decay", "router_temp": "grouped router: softmax temperature",
}


def _flag_type(default, name):
    kind = type(default) if default is not None else str

    def convert(text: str):
        if kind is bool:  # bool("false") would be True
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"--{name} needs true or false, got {text!r}")
            return text.lower() in ("true", "1")
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name} needs a {kind.__name__}, got {text!r}") from None
        return value

    convert.__name__ = kind.__name__
    return convert


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per HiMoEConfig field, card spelling (--num_moes) and dashed (--num-moes).
    Defaults are suppressed so that we know which flags the user actually gave."""
    defaults = HiMoEConfig()
    for f in dataclasses.fields(HiMoEConfig):
        if f.name in ("vocab_size", "group_experts"):  # set by the tokenizer, `experts add`
            continue
        names = ALIASES.get(f.name, []) + [f"--{f.name}"] + (
            [f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = getattr(defaults, f.name)
        # The router types registered by now, those from outside the package included.
        choices, text = ((router_names(), router_help()) if f.name == "router" else
                         (CHOICES.get(f.name), HELP.get(f.name, "")))
        parser.add_argument(*names, dest=f.name, type=_flag_type(default, f.name),
                            choices=choices, default=argparse.SUPPRESS,
                            help=f"{text} (default: {default})")


def config_from_args(args: argparse.Namespace, resume: bool) -> HiMoEConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(HiMoEConfig)
             if hasattr(args, f.name)}
    if not resume:
        if "bpe_vocab_size" in given and given.get("tokenizer", "char") != "bpe":
            raise UserError("--vocab_size sets the size of a BPE vocabulary; add --tokenizer bpe "
                            "(a char vocabulary is the corpus's characters)")
        if "preset" in given:
            given = preset_values(given.pop("preset"), given)
        return dataclasses.replace(HiMoEConfig(), **given).validate()
    if "preset" in given:
        raise UserError("--preset sets up a new model; drop it when you --resume")
    from himoe.checkpoint.card import check_model_dir_flag, read_config

    check_model_dir_flag(given.get("model_dir", HiMoEConfig.model_dir))
    saved, _, _ = read_config(Path(given.get("model_dir", HiMoEConfig.model_dir)))
    for name in MODEL_FIELDS:
        if name in given and given[name] != getattr(saved, name):
            raise UserError(f"--{name} {given[name]} differs from the saved model's "
                            f"{getattr(saved, name)}; drop the flag to resume, or train a new "
                            "model in another --model_dir")
    return dataclasses.replace(saved, **given).validate()


def cmd_train(args) -> int:
    from himoe.distributed.launch import launched
    from himoe.training.trainer import Trainer

    with launched(args) as parallel:  # one process, or one rank of a torchrun job
        cfg = config_from_args(args, args.resume)
        Trainer(cfg, resume=args.resume, skip_nonfinite=args.skip_nonfinite,
                train_only=args.train_only, parallel=parallel, force=args.force).train()
    return 0


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grad_accum", "--grad-accum", type=int, default=1, metavar="A",
                        help="split each step's batch into A micro-batches (gradients "
                             "accumulated; same result, less memory)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and optimizer state "
                             "over the processes (FSDP2)")
    parser.add_argument("--expert_parallel", "--expert-parallel", type=int, default=1,
                        metavar="N", help="under torchrun with N processes: spread each MoE "
                                          "layer's experts over them")



def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model (the card's train_himoe.py)")
    add_config_flags(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --model_dir")
    train.add_argument("--force", action="store_true",
                       help="without --resume: replace the model already in --model_dir with "
                            "a new one (a folder of other files is never written to)")
    train.add_argument("--skip_nonfinite", "--skip-nonfinite", action="store_true",
                       help="skip a step whose loss or gradient norm is not finite (no update, "
                            "counted and logged) instead of stopping the run")
    train.add_argument("--train_only", "--train-only", default=None, metavar="SPEC",
                       help="with --resume: train only these parts, e.g. layer1.group3,"
                            "layer2.router,layer1.group3.expert2 (README: Working with single "
                            "experts); every other weight file stays byte for byte")
    add_parallel_flags(train)
    train.set_defaults(func=cmd_train)

