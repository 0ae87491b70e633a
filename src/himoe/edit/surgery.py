"""Changing single files of a saved model, atomically: swap one expert or router file for
another model's, or rewrite a few files (e.g. quantised experts).

Every change is a new complete save through himoe.checkpoint.atomic_dir at the same step:
the changed files are written, every other file of the manifest is copied byte for byte, and the new
manifest commits the set. A crash leaves the old save or the new one, and `himoe verify`
passes afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from himoe.checkpoint import atomic_dir, safe_path
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from himoe.checkpoint.quantize import dequantize_state
from himoe.edit.specs import SHARED, describe_file, spec_files, weight_files
from himoe.errors import UserError
from himoe.model.routers.registry import BALANCE_BIAS, WEIGHT


def current_manifest(model_dir: Path) -> dict:
    """The manifest of the complete save in model_dir, after settling an interrupted save.
    Refused when a listed file is missing or has another size: copying it on would save a
    broken model."""
    checkpoint.check_is_model_dir(model_dir)
    checkpoint.recover_model_dir(model_dir)
    path = model_dir / mf.MANIFEST_FILE
    try:
        manifest = mf.read(path)
    except ValueError as e:
        raise UserError(f"{path} is missing or broken ({e}); run `himoe verify --model_dir "
                        f"{model_dir}` and re-save the model before changing it") from None
    for kind, line in mf.check(model_dir, manifest):
        if kind != "content":  # a file changed on purpose (e.g. a router) is kept as it is
            raise UserError(f"{line}; restore it (`himoe verify --model_dir {model_dir}` "
                            "lists every problem) before changing the model")
    return manifest


def torch_writer(obj):
    return lambda f: torch.save(obj, f)


def rewrite(model_dir: Path, new_files: dict, drop: set[str] = frozenset()) -> None:
    """One atomic save of model_dir with new_files ({relative path: writer}) replacing
    their namesakes; every other file of the current save is kept byte for byte, but those
    in `drop` (weight files the save deletes; new_files may read them while it is staged)."""
    model_dir = Path(model_dir)
    manifest = current_manifest(model_dir)
    writers = {rel: checkpoint.copy_writer(model_dir, rel) for rel in manifest["files"]
               if rel not in drop}
    writers.update(new_files)
    try:
        with checkpoint.writing(model_dir):  # held already by the experts commands
            note = atomic_dir.save(model_dir, writers, manifest["step"])
    except OSError as e:
        raise UserError(f"saving the changed model to {model_dir} failed: {e.strerror or e}; "
                        "the previous save is kept, free some disk space or check the "
                        "permissions and try again") from None
    if note:
        print(f"himoe: {note}", file=sys.stderr, flush=True)


def logical_shapes(sd: dict) -> dict[str, tuple]:
    """{key: shape} as the model sees the file: quantised weights count as fp32 matrices."""
    return {k: tuple(v.shape) for k, v in dequantize_state(sd).items()}


def check_compatible(from_dir: Path, model_dir: Path, rel: str) -> None:
    """from_dir/rel may replace model_dir/rel: the same entries with the same shapes (a
    router's balancing bias is optional on either side)."""
    new_path, old_path = from_dir / rel, model_dir / rel
    new = logical_shapes(checkpoint.load_weight_file(from_dir, rel))
    old = logical_shapes(checkpoint.load_weight_file(model_dir, rel))
    for key, shape in old.items():
        if key == BALANCE_BIAS:
            continue
        if key not in new:
            raise UserError(f"{new_path} has no '{key}' entry, which {old_path} has; swap in "
                            "the same kind of file (an expert for an expert, a router for a "
                            "router)")
        if new[key] != shape:
            raise UserError(f"{new_path}: {key} has shape {new[key]} but {old_path} has "
                            f"{shape}; swap in a file from a model with the same sizes "
                            "(n_embd, expert width, experts per group)")
    extra = sorted(set(new) - set(old) - {BALANCE_BIAS})
    if extra:
        raise UserError(f"{new_path} has entries {extra} that {old_path} does not; swap in "
                        "the same kind of file")
    if BALANCE_BIAS in new and WEIGHT in old and new[BALANCE_BIAS] != (old[WEIGHT][0],):
        raise UserError(f"{new_path}: {BALANCE_BIAS} has shape {new[BALANCE_BIAS]} but the "
                        f"router needs ({old[WEIGHT][0]},); swap in a matching router")


def resolve_file(model_dir: Path, file: str | None, part: str | None, flag_file: str,
                 flag_part: str) -> str:
    """The one expert or router file named by --file RELPATH or --part SPEC."""
    cfg, _, _ = checkpoint.read_config(model_dir)
    movable = [f for f in weight_files(cfg) if f != "backbone.pt"]
    if not movable:
        raise UserError(f"{model_dir} is a dense model: it has no expert or router files")
    if (file is None) == (part is None):
        raise UserError(f"name the file to swap with {flag_file} RELPATH or {flag_part} SPEC "
                        "(one of the two)")
    if part is not None:
        files = spec_files(part, cfg, flag_part)
        if len(files) != 1 or files[0] == "backbone.pt":
            raise UserError(f"{flag_part} {part!r} names {len(files)} files; name one expert "
                            "or router, e.g. layer1.group2.expert3 or layer1.router")
        return files[0]
    rel = file.replace("\\", "/").removeprefix("./")
    if rel not in movable:
        raise UserError(f"{flag_file} {file!r} is not an expert or router file of {model_dir}; "
                        f"name one such as {movable[-1]}")
    return rel


def swap(model_dir: Path, from_dir: Path, rel: str) -> str:
    """Replace model_dir/rel with from_dir/rel after checking shapes; returns one line."""
    model_dir, from_dir = Path(model_dir), Path(from_dir)
    checkpoint.read_config(from_dir)  # a model directory, with any interrupted save settled
    src, dst = from_dir / rel, model_dir / rel
    if safe_path.lstat(from_dir, rel) is None:
        raise UserError(f"{src} does not exist; --from_dir must be a model with the same "
                        "layout (layers, groups, experts)")
    if src.resolve() == dst.resolve():
        raise UserError(f"--from_dir {from_dir} is --model_dir itself; swap from another model")
    check_compatible(from_dir, model_dir, rel)
    data = safe_path.read_bytes(from_dir, rel)
    rewrite(model_dir, {rel: lambda f: f.write(data)})
    cfg, _, _ = checkpoint.read_config(model_dir)
    layer, group, expert = describe_file(rel, cfg)
    what = ("the shared expert" if expert == SHARED else
            f"expert {expert} of group {group}" if expert else
            f"the router of group {group}" if group else "the level-1 router") + \
        f" in layer {layer}"
    return f"swapped {what}: {dst} now holds {src}"
