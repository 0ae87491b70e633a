"""`himoe train | generate | verify | bench`: the command line. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import math
import sys
from pathlib import Path

from himoe.config import (
    DEVICES,
    DTYPES,
    LOGGERS,
    MAX_NEW_TOKENS,
    MODEL_FIELDS,
    REG_FORMS,
    SEED_MAX,
    TOKENIZERS,
    HiMoEConfig,
)
from himoe.errors import UserError
from himoe.presets import PRESETS, preset_values
from himoe.router_registry import router_help, router_names

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
    "data_file": "training corpus: a UTF-8 text file, a directory or a glob of them (default: "
                 "the shipped hamlet.txt)",
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


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


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
    from himoe.checkpoint import check_model_dir_flag, read_config

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


def cmd_verify(args) -> int:
    from himoe.verify import verify

    problems, summary = verify(Path(args.model_dir))
    for line in problems:
        print(f"himoe: verify: {line}", file=sys.stderr)
    if problems:
        return 2
    print(summary)
    return 0


def seed_flag(text: str) -> int:
    """argparse type of --seed: an integer every random generator here accepts."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed needs an integer, got {text!r}") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and {SEED_MAX} (2^63 - 1), "
                                         f"got {seed}")
    return seed


def check_generate_args(args) -> None:
    """Flags that can never work, refused before the model is loaded."""
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be between 0 and {MAX_NEW_TOKENS:,}, got "
                        f"{args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                        f"{args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be >= 1 (above the vocabulary size it keeps every "
                        f"token), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")


def cmd_generate(args) -> int:
    import torch

    from himoe.checkpoint import load_model
    from himoe.data.corpus import show_chars
    from himoe.data.tokenizer import tokenizer_for
    from himoe.memory import check_generation_fits

    check_generate_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device "
                        "cpu or auto")
    device = "cuda" if args.device == "cuda" or (args.device == "auto"
                                                 and torch.cuda.is_available()) else "cpu"
    model, cfg, vocab, _ = load_model(Path(args.model_dir), device)
    check_generation_fits(cfg, device, args.num_samples, len(args.prompt) + args.max_new_tokens)
    model.eval()
    tok = tokenizer_for(cfg, vocab, Path(args.model_dir))
    # Characters the model never saw: refused by default (--unknown error), or dropped with
    # a note naming them (--unknown skip). The printed prompt is the one the model got.
    prompt, missing = tok.drop_unknown(args.prompt)
    if missing and args.unknown == "error":
        raise UserError(f"--prompt has characters outside the model's vocabulary: "
                        f"{show_chars(missing)}; remove them, or pass --unknown skip to drop "
                        "them")
    if missing:
        print(f"himoe: dropped prompt characters outside the vocabulary: "
              f"{show_chars(missing)}", file=sys.stderr)
    args.prompt = prompt
    context = tok.encode(args.prompt) if args.prompt else [tok.blank_token()]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batch = torch.tensor([context] * args.num_samples, device=device)  # one batched run
    out = model.generate(batch, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                         generator=gen)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(row[len(context):]))
    return 0


def load_benchmarks():
    """benchmarks/throughput.py of the source checkout: it is not part of the installed
    package. Looked for beside src/ (editable install), then in the current directory."""
    import himoe

    roots = (Path(himoe.__file__).resolve().parents[2], Path.cwd())
    for path in (root / "benchmarks" / "throughput.py" for root in roots):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("himoe_benchmarks_throughput", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            return module
    raise UserError("himoe bench needs a source checkout: run it from the himoe repository")


def cmd_bench(args) -> int:
    return load_benchmarks().main(args.bench_argv, prog="himoe bench")


def build_parser() -> Parser:
    parser = Parser(prog="himoe", description="Hierarchical Mixture-of-Experts language models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    from himoe.distributed.launch import add_parallel_flags
    add_parallel_flags(train)
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample text from a saved model")
    gen.add_argument("--model_dir", "--model-dir", default="model")
    gen.add_argument("--prompt", default="", help="text to continue (default: blank context)")
    gen.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=400)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top_k", "--top-k", type=int, default=None)
    gen.add_argument("--top_p", "--top-p", type=float, default=None)
    gen.add_argument("--num_samples", "--num-samples", type=int, default=1,
                     help="independent samples of the same prompt, generated as one batch")
    gen.add_argument("--seed", type=seed_flag, default=1337)
    gen.add_argument("--device", choices=DEVICES, default="auto")
    gen.add_argument("--no_cache", "--no-cache", action="store_true",
                     help="recompute the context at every step instead of using the KV cache")
    gen.add_argument("--unknown", choices=("error", "skip"), default="error",
                     help="prompt characters outside the vocabulary: error (refuse, listing "
                          "them) or skip (drop them, listing them on stderr)")
    gen.set_defaults(func=cmd_generate)

    check = sub.add_parser("verify", help="check a saved model: manifest, sizes, sha256, "
                                          "that every file loads and the model builds")
    check.add_argument("--model_dir", "--model-dir", default="model")
    check.set_defaults(func=cmd_verify)

    # The flags belong to benchmarks/throughput.py (--help included): main() passes them on.
    bench = sub.add_parser("bench", add_help=False,
                           help="speed and memory against the baselines (source checkout; "
                                "`himoe bench --help` for its flags)")
    bench.set_defaults(func=cmd_bench)

    from himoe import analyze_cli, chat, eval_cli, experts_cli  # own modules, one per command
    experts_cli.add_parser(sub)
    analyze_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    chat.add_parser(sub)
    from himoe.hf import export as hf_export
    hf_export.add_parser(sub)
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse takes a value that starts with '-' for a flag
    (it only knows plain negatives like -1), so the validation that names the real problem
    would never see it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_argv = rest
    try:
        return args.func(args)
    except UserError as e:
        print(f"himoe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not a bug: disk full, permissions, I/O errors
        hint = {errno.ENOSPC: "free some disk space", errno.EACCES: "check the permissions",
                errno.EROFS: "pick a writable location"}.get(e.errno, "check the path")
        where = f" ({e.filename})" if e.filename else ""
        print(f"himoe: error: {e.strerror or e}{where}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("himoe: interrupted; the last complete save is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
