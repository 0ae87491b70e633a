"""`himoe experts list | add | swap | quantize | prune`: look at and change single expert and
router files.

Heavy imports (torch, the model) happen inside the commands, so that a bad flag is refused
at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from himoe.cli.options import add_device, add_model_dir, seed_flag
from himoe.errors import UserError
from himoe.model.routers.registry import BALANCE_BIAS, router_spec


def load_for_eval(model_dir: Path, device_flag: str, data_file: str | None):
    """(model, cfg, vocab, step, val_ids, corpus path, device, dtype): a saved model and the
    validation split it was trained on, as training.evaluation.evaluate wants them."""
    from himoe.checkpoint.card import load_model
    from himoe.training.device import resolve_device

    model, cfg, vocab, step = load_model(Path(model_dir))
    # The saved run's dtype on the device asked for now.
    device, dtype = resolve_device(dataclasses.replace(cfg.run, device=device_flag))
    val, path = validation_data(model_dir, cfg, vocab, data_file)
    return model.to(device), cfg, vocab, step, val, path, device, dtype


def validation_data(model_dir: Path, cfg, vocab: list[str], data_file: str | None):
    """(validation token ids, corpus label) of the corpus a saved model was trained on."""
    from himoe.data.tokenizers import tokenizer_for
    from himoe.data.validation import validation_split

    val, path, dropped = validation_split(cfg, tokenizer_for(cfg, vocab, model_dir), data_file)
    if dropped:
        print(f"himoe: note: skipped {dropped} characters of {path} that are outside the "
              "model's vocabulary", file=sys.stderr)
    return val, path


def _dtype_name(sd: dict) -> str:
    """The dtype of the file's largest tensor: its weight matrix."""
    biggest = max(sd.values(), key=lambda t: t.numel())
    return str(biggest.dtype).removeprefix("torch.")


def expert_rows(model_dir: Path, model, cfg, layers: list[dict]) -> list[list]:
    """One table row per expert and router file; layers: evaluate()'s per-layer figures."""
    from himoe.checkpoint.card import load_weight_file
    from himoe.checkpoint.quantize import dequantize_state
    from himoe.edit.prune import expert_shares
    from himoe.edit.specs import SHARED, describe_file, weight_files

    # Router buffers (balancing biases, logit EMA) are state, not parameters.
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} | {BALANCE_BIAS}
    shares = expert_shares(layers, cfg)
    rows = []
    for rel in weight_files(cfg):
        if rel == "backbone.pt" or not (model_dir / rel).exists():  # a shared expert saved
            continue  # before it had a file of its own is still inside backbone.pt
        sd = load_weight_file(model_dir, rel)
        params = sum(v.numel() for k, v in dequantize_state(sd, rel).items() if k not in buffers)
        layer, group, expert = describe_file(rel, cfg)
        fig = layers[layer - 1]
        if expert == SHARED:
            share = 1.0  # every token runs it
        elif expert is not None:
            share = shares[layer - 1, group - 1, expert - 1]
        elif group is not None:
            share = fig["group_share"][group - 1]  # the tokens this group's router routes
        else:
            share = 1.0  # the level-1 router routes every token
        rows.append([rel, layer, group if group is not None else "-",
                     expert if expert is not None else "router", f"{params:,}",
                     f"{(model_dir / rel).stat().st_size:,}", _dtype_name(sd), f"{share:.1%}"])
    return rows


def cmd_list(args) -> int:
    from himoe.cli.table import format_table
    from himoe.training.evaluation import evaluate

    model_dir = Path(args.model_dir)
    model, cfg, _, step, val, path, device, dtype = load_for_eval(model_dir, args.device,
                                                                  args.data_file)
    if not model.moe_layers:
        print(f"{model_dir}: a dense model (step {step}): no expert or router files")
        return 0
    ev = evaluate(model, val, cfg, device, dtype)
    rows = expert_rows(model_dir, model, cfg, ev["layers"])
    print(f"{model_dir}: step {step}; share = share of the routed assignments of "
          f"{cfg.eval_iters} validation batch(es) of {cfg.batch_size} x {cfg.block_size} tokens "
          f"of {path} (val loss {ev['val_loss']:.4f})")
    print(format_table(["file", "layer", "group", "expert", "params", "bytes", "dtype",
                        "share"], rows))
    return 0


def _verified(model_dir: Path) -> str:
    from himoe.checkpoint.verify import verify

    problems, summary = verify(model_dir)
    if problems:  # the checks before saving should make this impossible
        raise UserError(f"after the change, verify found: {problems[0]}")
    return summary


def cmd_swap(args) -> int:
    from himoe.checkpoint.card import writing
    from himoe.edit.surgery import resolve_file, swap

    model_dir = Path(args.model_dir)
    with writing(model_dir):
        rel = resolve_file(model_dir, args.file, args.part, "--file", "--part")
        print(swap(model_dir, Path(args.from_dir), rel))
        print(_verified(model_dir))
    return 0


def cmd_quantize(args) -> int:
    from himoe.checkpoint.card import writing

    with writing(Path(args.model_dir)):
        return _quantize(args)


def _quantize(args) -> int:
    from himoe.checkpoint.card import load_model, load_weight_file
    from himoe.checkpoint.quantize import is_quantized, quantize_expert
    from himoe.edit.specs import describe_file, spec_files, weight_files
    from himoe.edit.surgery import current_manifest, rewrite, torch_writer
    from himoe.training.evaluation import evaluate

    model_dir = Path(args.model_dir)
    model, cfg, _, _, val, path, device, dtype = load_for_eval(model_dir, args.device,
                                                               args.data_file)
    if router_spec(cfg.router).dense:
        raise UserError(f"{model_dir} is a dense model: it has no expert files to quantise")
    named = spec_files(args.only, cfg, "--only") if args.only else weight_files(cfg)
    experts = [rel for rel in named if describe_file(rel, cfg)[2] is not None
               and (model_dir / rel).exists()]  # an old shared expert: in backbone.pt
    if not experts:
        raise UserError(f"{'--only ' + args.only if args.only else model_dir} names no expert "
                        "files (routers and the backbone stay fp32); name experts, e.g. "
                        "layer1.group2 or layer1.group2.expert3")
    current_manifest(model_dir)  # refuse a damaged directory before any work
    new, already = {}, 0
    for rel in experts:
        sd = load_weight_file(model_dir, rel)
        if is_quantized(sd):
            already += 1
        else:
            new[rel] = quantize_expert(sd)
    if not new:
        print(f"nothing to do: the {already} expert files named are already int8")
        return 0
    before = evaluate(model, val, cfg, device, dtype)["val_loss"]
    bytes_before = sum(os.lstat(model_dir / rel).st_size for rel in new)
    rewrite(model_dir, {rel: torch_writer(sd) for rel, sd in new.items()})
    bytes_after = sum((model_dir / rel).stat().st_size for rel in new)
    # Evaluated from the files, through the loader's dequantisation: what every command sees.
    model, cfg, _, _ = load_model(model_dir, device)
    after = evaluate(model, val, cfg, device, dtype)["val_loss"]
    saved = bytes_before - bytes_after
    skipped = f" ({already} were already int8)" if already else ""
    print(f"quantised {len(new)} expert files to int8 (per output channel){skipped}: "
          f"{bytes_before:,} -> {bytes_after:,} bytes, {saved:,} saved "
          f"({saved / bytes_before:.0%})")
    print(f"validation loss {before:.4f} -> {after:.4f} ({after - before:+.4f}) on "
          f"{cfg.eval_iters} validation batch(es) of {path}")
    print(_verified(model_dir))
    return 0


def cmd_add(args) -> int:
    from himoe.checkpoint.card import writing
    from himoe.edit.grow import add_expert

    model_dir = Path(args.model_dir)
    with writing(model_dir):
        print(add_expert(model_dir, args.layer, args.group, args.init, args.seed))
        print(_verified(model_dir))
    return 0


def cmd_prune(args) -> int:
    from himoe.checkpoint.card import writing

    with writing(Path(args.model_dir)):
        return _prune(args)


def _prune(args) -> int:
    from himoe.checkpoint import card_layout, safe_path
    from himoe.checkpoint.card import TRAIN_STATE_FILE, load_model, read_config
    from himoe.cli.table import format_table
    from himoe.edit import prune
    from himoe.training.device import resolve_device
    from himoe.training.evaluation import evaluate

    model_dir = Path(args.model_dir)
    cfg, vocab, step = read_config(model_dir)
    prune.check_prunable(cfg, model_dir)
    chosen = prune.named(args.only, cfg) if args.only else None  # before any work
    try:
        val, path = validation_data(model_dir, cfg, vocab, args.data_file)
    except UserError as e:
        if chosen is None:
            raise UserError(f"the experts' shares need the corpus, which cannot be read ({e}); "
                            "pass --data_file, or name the experts with --only") from None
        print(f"himoe: note: the corpus cannot be read, so no validation loss ({e})",
              file=sys.stderr)
        val = None
    device, dtype = resolve_device(dataclasses.replace(cfg.run, device=args.device))
    shares, before = {}, None
    if val is not None:
        ev = evaluate(load_model(model_dir, device)[0], val, cfg, device, dtype)
        shares, before = prune.expert_shares(ev["layers"], cfg), ev["val_loss"]
    if chosen is None and args.min_share is not None:
        chosen, spared = prune.below_share(shares, args.min_share, max(1, cfg.top_k_experts))
        if spared:
            print(f"himoe: note: every expert of {len(spared)} group(s) is below --min_share "
                  f"(layer.group: {', '.join(f'{L + 1}.{g + 1}' for L, g in spared)}); a group "
                  "cannot be empty, so each keeps its busiest expert", file=sys.stderr)
    elif chosen is None:
        chosen = prune.beyond_best(shares, args.keep_per_group)
    if not chosen:
        how = (f"--min_share {args.min_share}" if args.min_share is not None
               else f"--keep_per_group {args.keep_per_group}")
        raise UserError(f"{how} selects no expert, so there is nothing to prune; `himoe "
                        "experts list` prints each expert's share")
    kept = prune.kept_experts(cfg, chosen)
    rows, gone = [], 0
    for L, row in enumerate(kept):
        for g, keep in enumerate(row):
            for j in range(cfg.group_sizes(L)[g]):
                size = os.lstat(model_dir / card_layout.expert_file(cfg, L, g, j)).st_size
                fate = ("prune" if j not in keep else "keep" if keep.index(j) == j
                        else f"keep as {keep.index(j) + 1}")
                gone += size if j not in keep else 0
                share = f"{shares[L, g, j]:.2%}" if shares else "-"
                rows.append([L + 1, g + 1, j + 1, share, f"{size:,}", fate])
    where = (f"share = share of the routed assignments of {cfg.eval_iters} validation "
             f"batch(es) of {path} (val loss {before:.4f})" if val is not None
             else "no shares (no corpus)")
    print(f"{model_dir}: step {step}; {where}")
    print(format_table(["layer", "group", "expert", "share", "bytes", "fate"], rows))
    total = sum(len(keep) for row in kept for keep in row) + len(chosen)
    renamed = prune.renamed_files(cfg, kept)
    verb = "would" if args.dry_run else "will"
    print(f"{'dry run: ' if args.dry_run else ''}pruning {len(chosen)} of {total} experts "
          f"({gone:,} bytes), keeping {total - len(chosen)}" +
          (f"; {len(renamed)} kept expert(s) {verb} move to a lower number, their files "
           "renamed with their bytes unchanged, and config.json's expert_index_map maps each "
           "expert's original number to its new one:" if renamed else ""))
    for src, dst in renamed:
        print(f"  {src} -> {dst}")
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    has_state = safe_path.lstat(model_dir, TRAIN_STATE_FILE) is not None
    prune.prune(model_dir, cfg, vocab, step, kept)
    if val is not None:
        after_model, after_cfg, _, _ = load_model(model_dir, device)
        after = evaluate(after_model, val, after_cfg, device, dtype)["val_loss"]
        print(f"validation loss {before:.4f} -> {after:.4f} ({after - before:+.4f}) on "
              f"{cfg.eval_iters} validation batch(es) of {path}")
    if has_state:
        print(f"{TRAIN_STATE_FILE}: the pruned experts' optimiser moments are dropped, the "
              f"others' moved with their experts; `--resume` goes on from step {step}")
    print(_verified(model_dir))
    return 0


def share_flag(text: str) -> float:
    """argparse type of --min_share: a fraction (0.02) or a percentage (2%)."""
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min_share needs a fraction such as 0.02 or a "
                                         f"percentage such as 2%, got {text!r}") from None
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"--min_share must be between 0 and 1 (0% and 100%), "
                                         f"got {text!r}")
    return share


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a whole number of 1 or more, got {text!r}")
    return int(text)


def add_parser(sub) -> None:
    experts = sub.add_parser("experts", help="list, add, swap, quantise or prune single experts "
                                             "and routers")
    inner = experts.add_subparsers(dest="experts_command", required=True,
                                   metavar="{list,add,swap,quantize,prune}",
                                   parser_class=type(experts))

    def common(p, data=True):
        add_model_dir(p)
        add_device(p)
        if data:
            p.add_argument("--data_file", "--data-file", default=None,
                           help="corpus for the validation figures (default: the one in "
                                "config.json, else the shipped hamlet.txt)")

    ls = inner.add_parser("list", help="one row per expert and router file, with its share of "
                                       "validation tokens")
    common(ls)
    ls.set_defaults(func=cmd_list)

    ad = inner.add_parser("add", help="add an expert to one group: its next model_00K.pt, a "
                                      "wider group router, config.json")
    add_model_dir(ad)
    ad.add_argument("--layer", type=int, required=True, help="MoE layer, 1-based")
    ad.add_argument("--group", type=int, required=True, help="group (MoE block), 1-based")
    ad.add_argument("--init", default="random",
                    help="random (as at initialisation) or copy:J, a copy of expert J of the "
                         "same group, router row included (default: random)")
    ad.add_argument("--seed", type=seed_flag, default=0, help="seed of the random initialisation")
    ad.set_defaults(func=cmd_add)

    sw = inner.add_parser("swap", help="replace one expert or router file with the same file "
                                       "of another model")
    add_model_dir(sw)
    sw.add_argument("--from_dir", "--from-dir", required=True,
                    help="the model directory to take the file from")
    sw.add_argument("--file", default=None,
                    help="relative path, e.g. layer_01_moe_expert_002/model_003.pt")
    sw.add_argument("--part", default=None,
                    help="or a SPEC: layer1.group2.expert3, layer1.group2.router, layer1.router")
    sw.set_defaults(func=cmd_swap)

    qu = inner.add_parser("quantize", help="int8 weight-only quantisation of expert files "
                                           "(per output channel, symmetric)")
    common(qu)
    qu.add_argument("--only", default=None,
                    help="SPEC of the experts to quantise, e.g. layer1.group2,layer2 "
                         "(default: all)")
    qu.set_defaults(func=cmd_quantize)

    pr = inner.add_parser("prune", help="remove experts (and their router rows) by validation "
                                        "share or by name")
    common(pr)
    how = pr.add_mutually_exclusive_group(required=True)
    how.add_argument("--min_share", "--min-share", type=share_flag, default=None,
                     help="prune every expert whose share of validation assignments (as "
                          "`experts list` prints it) is below this, e.g. 0.01 or 1%%")
    how.add_argument("--keep_per_group", "--keep-per-group", type=positive_int, default=None,
                     metavar="K", help="keep the K experts of highest share in each group")
    how.add_argument("--only", default=None, metavar="SPEC",
                     help="prune the experts named, e.g. layer1.group3.expert2,layer2.group1."
                          "expert4")
    pr.add_argument("--dry_run", "--dry-run", action="store_true",
                    help="print what would go and what stays; change nothing")
    pr.set_defaults(func=cmd_prune)
