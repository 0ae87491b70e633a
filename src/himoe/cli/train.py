"""`himoe train`: one flag per HiMoEConfig field, and the parallel modes' flags."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from himoe.cli.presets import PRESETS, preset_values
from himoe.config import SHAPE_FIELDS, HiMoEConfig, ModelConfig
from himoe.errors import UserError
from himoe.model.routers.registry import router_help, router_names

# The flags whose values are known only here: presets are a CLI notion, and the router
# types are those registered by now (those from outside the package included).
CLI_CHOICES = {"preset": lambda: tuple(PRESETS), "router": router_names}


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


def add_config_flags(parser: argparse.ArgumentParser,
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per HiMoEConfig field (only: these fields), card spelling (--num_moes) and
    dashed (--num-moes). Defaults are suppressed so that we know which flags the user
    actually gave."""
    defaults = HiMoEConfig()
    for f in dataclasses.fields(HiMoEConfig):
        if f.metadata.get("no_flag"):  # set by the tokenizer, `himoe experts add`
            continue
        if only is not None and f.name not in only:
            continue
        flag = f.metadata.get("flag")  # e.g. the BPE target size takes --vocab_size
        names = ([f"--{flag}", f"--{flag.replace('_', '-')}"] if flag else []) + [
            f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = getattr(defaults, f.name)
        choices = CLI_CHOICES[f.name]() if f.name in CLI_CHOICES else f.metadata.get("choices")
        text = router_help() if f.name == "router" else f.metadata["help"]
        parser.add_argument(*names, dest=f.name, type=_flag_type(default, f.name),
                            choices=choices, default=argparse.SUPPRESS,
                            help=f"{text} (default: {default})")


def given_settings(args: argparse.Namespace) -> dict:
    """{field: value} of the config flags given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(HiMoEConfig)
            if hasattr(args, f.name)}


def config_from_args(args: argparse.Namespace, resume: bool) -> HiMoEConfig:
    given = given_settings(args)
    init_from = getattr(args, "init_from", None)
    if init_from is not None:
        if resume:
            raise UserError("--init_from starts a new run from a saved model; --resume goes on "
                            "with the run in --model_dir: pass one of them")
        if not str(init_from).strip():
            raise UserError("--init_from is empty; name the folder of a saved model")
        model_dir = Path(given.get("model_dir", HiMoEConfig.model_dir))
        if model_dir.resolve() == Path(init_from).resolve():
            raise UserError(f"--init_from and --model_dir are both {model_dir}; the new run "
                            "needs a folder of its own, so pass another --model_dir")
        return branch_config(Path(init_from), given)
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
    check_shape_flags(given, saved, "the saved model's",
                      "drop the flag to resume, or train a new model in another --model_dir")
    from himoe.training.optim import check_lr_scales

    cfg = dataclasses.replace(saved, **given).validate()
    check_lr_scales(cfg, saved)
    return cfg


def check_shape_flags(given: dict, saved: HiMoEConfig, whose: str, fix: str) -> None:
    """A flag that fixes a weight's shape must agree with the saved model it continues."""
    for name in SHAPE_FIELDS:
        if name in given and given[name] != getattr(saved, name):
            raise UserError(f"--{name} {given[name]} differs from {whose} "
                            f"{getattr(saved, name)}; {fix}")


def branch_config(source: Path, given: dict) -> HiMoEConfig:
    """--init_from: the saved model's shape, tokenizer and routing, and this run's training
    settings (the flags, else the defaults: a new schedule from step 0). Routing flags may
    change the losses, as on --resume; a shape flag must agree with the saved model."""
    from himoe.checkpoint.card import read_config

    if "preset" in given:
        raise UserError("--preset sets up a new model's shape; --init_from takes the saved "
                        "model's, so drop --preset")
    saved, _, _ = read_config(source)
    check_shape_flags(given, saved, f"{source}'s",
                      "--init_from keeps the saved model's shape, so drop the flag")
    model = {f.name: getattr(saved, f.name) for f in dataclasses.fields(ModelConfig)}
    return dataclasses.replace(HiMoEConfig(), **model | given).validate()


def cmd_train(args) -> int:
    from himoe.distributed.launch import launched
    from himoe.training.trainer import Trainer

    with launched(args) as parallel:  # one process, or one rank of a torchrun job
        cfg = config_from_args(args, args.resume)
        start = Trainer.resume if args.resume else Trainer.new
        source = {"init_from": Path(args.init_from)} if args.init_from else {}
        start(cfg, skip_nonfinite=args.skip_nonfinite, train_only=args.train_only,
              parallel=parallel, force=args.force, **source).train()
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
    train.add_argument("--init_from", "--init-from", default=None, metavar="DIR",
                       help="start a new run (step 0, a new optimiser and schedule) from the "
                            "weights, tokenizer and shape of the model saved in DIR, on any "
                            "corpus: continued pre-training, fine-tuning, or a branch to merge "
                            "later (himoe merge)")
    train.add_argument("--force", action="store_true",
                       help="without --resume: replace the model already in --model_dir with "
                            "a new one (a folder of other files is never written to)")
    train.add_argument("--skip_nonfinite", "--skip-nonfinite", action="store_true",
                       help="skip a step whose loss or gradient norm is not finite (no update, "
                            "counted and logged) instead of stopping the run")
    train.add_argument("--train_only", "--train-only", default=None, metavar="SPEC",
                       help="with --resume: train only these parts, e.g. layer1.group3,"
                            "layer2.router,layer1.group3.expert2 (docs/experts.md); every "
                            "other weight file stays byte for byte")
    add_parallel_flags(train)
    train.set_defaults(func=cmd_train)

