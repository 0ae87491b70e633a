"""`himoe verify --model_dir DIR`: is DIR one complete save that loads?

Checks, after finishing or discarding an interrupted save: no entry at any depth is a
symbolic link, a special file (FIFO, device) or a hard link; manifest.json is sane; every file
it lists is present with its size and sha256; every .pt file loads with weights_only=True
(weight files: finite numbers only); config.json has values of the declared types and ranges;
config.json, manifest.json and train_state.pt name the same step; the model builds and
takes the weights. Each problem is one line.
"""

from __future__ import annotations

from pathlib import Path

from himoe.checkpoint import atomic_dir, safe_path
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from himoe.data.tokenizers import tokenizer_for
from himoe.errors import UserError
from himoe.model import HiMoEModel


def verify(model_dir: Path) -> tuple[list[str], str]:
    """(problems, summary); the summary is meaningful only when there are no problems."""
    model_dir = Path(model_dir)
    try:
        checkpoint.check_is_model_dir(model_dir)
    except UserError as e:
        return [str(e)], ""
    with atomic_dir.locked(model_dir):
        try:
            checkpoint.recover_locked(model_dir)
        except UserError as e:
            return [str(e)], ""
        return _verify_locked(model_dir)


def _verify_locked(model_dir: Path) -> tuple[list[str], str]:
    # A link or special file anywhere inside: what could lead outside, or block a reader.
    scanned = safe_path.scan(model_dir)
    problems: list[str] = list(scanned)
    manifest_path = model_dir / mf.MANIFEST_FILE
    manifest = None
    if safe_path.lstat(model_dir, mf.MANIFEST_FILE, "any") is None:
        problems.append(f"{manifest_path} is missing, so no save in {model_dir} is known to "
                        "be complete; save it again (e.g. `himoe train --resume` with a larger "
                        "--max_iters)")
    else:
        try:
            manifest = mf.read(manifest_path)
        except ValueError as e:
            problems.append(f"{manifest_path} is broken: {e}; save the model again")
    if manifest is not None:
        names = list(manifest["files"])
        found = mf.check(model_dir, manifest)
        # An unsafe entry is already a line of the scan.
        problems += [line for kind, line in found if kind != "unsafe" or not scanned]
    else:  # still check what is there
        names = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*.pt")
                       if mf.is_safe_name(str(p.relative_to(model_dir))))
        found = []
    # A missing or truncated file blocks building the model; a changed one (e.g. a router
    # swapped in on purpose) is reported but the model is still tried.
    unusable = sum(kind != "content" for kind, _ in found)
    train_state = None
    for rel in names:
        try:
            if not rel.endswith(".pt") or safe_path.lstat(model_dir, rel) is None:
                continue
            obj = checkpoint.load_weight_file(model_dir, rel,
                                              plain=rel != checkpoint.TRAIN_STATE_FILE)
        except safe_path.UnsafeEntry:  # a line of the scan already
            unusable += 1
            continue
        except UserError as e:
            problems.append(str(e))
            unusable += 1
            continue
        if rel == checkpoint.TRAIN_STATE_FILE:
            train_state = obj
    try:
        cfg, vocab, step = checkpoint.read_config_unlocked(model_dir)
        tokenizer_for(cfg, vocab, model_dir)  # a BPE model's tokenizer.json loads and fits
    except UserError as e:
        if not (isinstance(e, safe_path.UnsafeEntry) and scanned):
            problems.append(str(e))
        return problems, ""
    if manifest is not None and manifest["step"] != step:
        problems.append(f"{manifest_path} is for step {manifest['step']} but config.json says "
                        f"{step}; save the model again")
    if train_state is not None and train_state.get("step") != step:
        problems.append(f"{model_dir / checkpoint.TRAIN_STATE_FILE} is for step "
                        f"{train_state.get('step')} but config.json says {step}; --resume "
                        "would not continue exactly, save the model again")
    total = None
    if not unusable:  # a missing or unloadable file was already reported once
        try:
            model = HiMoEModel(cfg)
            checkpoint.from_files(model, model_dir)
            total, _ = model.parameter_counts()  # not counting empty slots of ragged groups
        except UserError as e:
            if not (isinstance(e, safe_path.UnsafeEntry) and scanned):
                problems.append(str(e))
        except (RuntimeError, TypeError, ValueError) as e:
            text = str(e).strip()
            problems.append(f"the files in {model_dir} do not build the model config.json "
                            f"describes ({type(e).__name__}: "
                            f"{text.splitlines()[0] if text else ''})")
    if problems:
        return problems, ""
    listed = f"{len(names)} files match {mf.MANIFEST_FILE}"
    return [], f"OK {model_dir}: {listed}, step {step}, model loads ({total / 1e6:.2f}M parameters)"
