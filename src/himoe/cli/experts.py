"""`himoe experts list | add | swap | quantize`: look at and change single expert and router files.

Heavy imports (torch, the model) happen inside the commands, so that a bad flag is refused
at once.
"""

from __future__ import annotations

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
    from himoe.data.tokenizers import tokenizer_for
    from himoe.data.validation import validation_split
    from himoe.training.device import resolve_device

    model, cfg, vocab, step = load_model(Path(model_dir))
    # The saved run's dtype on the device asked for now.
    device, dtype = resolve_device(dataclasses.replace(cfg.run, device=device_flag))
    val, path, dropped = validation_split(cfg, tokenizer_for(cfg, vocab, model_dir), data_file)
    if dropped:
        print(f"himoe: note: skipped {dropped} characters of {path} that are outside the "
              "model's vocabulary", file=sys.stderr)
    return model.to(device), cfg, vocab, step, val, path, device, dtype


def _dtype_name(sd: dict) -> str:
    """The dtype of the file's largest tensor: its weight matrix."""
    biggest = max(sd.values(), key=lambda t: t.numel())
    return str(biggest.dtype).removeprefix("torch.")


def expert_rows(model_dir: Path, model, cfg, layers: list[dict]) -> list[list]:
    """One table row per expert and router file; layers: evaluate()'s per-layer figures."""
    from himoe.checkpoint.card import load_weight_file
    from himoe.checkpoint.quantize import dequantize_state
    from himoe.edit.specs import describe_file, weight_files

    # Router buffers (balancing biases, logit EMA) are state, not parameters.
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} | {BALANCE_BIAS}
    M = cfg.num_experts
    rows = []
    for rel in weight_files(cfg):
        if rel == "backbone.pt":
            continue
        sd = load_weight_file(model_dir, rel)
        params = sum(v.numel() for k, v in dequantize_state(sd, rel).items() if k not in buffers)
        layer, group, expert = describe_file(rel, cfg)
        fig = layers[layer - 1]
        if expert is not None:
            share = fig["expert_share"][(group - 1) * M + expert - 1]
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
    experts = [rel for rel in named if describe_file(rel, cfg)[2] is not None]
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


def add_parser(sub) -> None:
    experts = sub.add_parser("experts", help="list, swap or quantise single experts and routers")
    inner = experts.add_subparsers(dest="experts_command", required=True,
                                   metavar="{list,add,swap,quantize}", parser_class=type(experts))

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
