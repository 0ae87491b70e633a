"""Stacked in-memory weights <-> the card's modular checkpoint, one file per expert and router.

    config.json                      hyperparameters, vocabulary, last saved step
    backbone.pt                      embeddings, attention, LayerNorms (LM head is tied)
    [layer_LL_]shared_expert.pt      the layer's shared expert, where the model has one:
                                     {"fc1.weight": [S, D], ...} as an expert's (in backbone.pt
                                     in directories saved before it had a file of its own)
    [layer_LL_]main_router.pt        level-1 gate: {"weight": [N, D]}
    [layer_LL_]moe_expert_00G/
        router.pt                    level-2 gate of group G: {"weight": [M, D]}
        model_00J.pt                 expert J: {"fc1.weight": [F, D], "fc1.bias": [F],
                                                "fc2.weight": [D, F], "fc2.bias": [D]}
    train_state.pt                   optimiser, schedule, RNG and data position (for --resume)
    metrics.jsonl                    one line per evaluation, up to the saved step
    tokenizer.json                   --tokenizer bpe only: the byte-level BPE tokenizer
    manifest.json                    path, size and sha256 of every file above, and the step

The `layer_LL_` prefix appears only when n_layer > 1, as the card lists. Group and expert
numbers are 1-based, as in the card. Every .pt file is a plain state_dict that loads with
torch.load(..., weights_only=True); an expert file loads into himoe.Expert on its own.
himoe.checkpoint.card_layout names these files and maps the stacked tensors to them.

A save is atomic (atomic_dir): all of these files belong to the same step, and
manifest.json, written last, is the commit record. Loading first finishes or discards a save
that a crash interrupted, so a reader always sees one complete save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import torch

from himoe.checkpoint import atomic_dir, card_layout, safe_path
from himoe.checkpoint import manifest as mf
from himoe.checkpoint.quantize import dequantize_state
from himoe.config import HiMoEConfig, ModelConfig
from himoe.data.tokenizers import TOKENIZER_FILE, tokenizer_for
from himoe.errors import UserError
from himoe.model import HiMoEModel

CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2  # 2: expert_hidden 0 splits the routed width over a token's experts


def to_files(model: HiMoEModel) -> dict[str, dict[str, torch.Tensor]]:
    """{relative path: state_dict} for every weight file (himoe.checkpoint.card_layout maps the MoE
    layers' stacked tensors to theirs). Tensors are cloned so that each file holds only its
    own slice, not the whole stacked storage."""
    cfg = model.cfg
    state = model.state_dict()
    moe_layers = model.moe_layers
    files: dict[str, dict[str, torch.Tensor]] = {"backbone.pt": {}}
    for k, v in state.items():
        shared = card_layout.SHARED_KEY.fullmatch(k)
        if shared is not None:
            rel = card_layout.shared_expert_file(cfg, int(shared[1]))
            files.setdefault(rel, {})[shared[2]] = v.clone()
        elif k != "lm_head.weight" and not any(k.startswith(f"blocks.{i}.ffn.")
                                               for i in moe_layers):
            files["backbone.pt"][k] = v.clone()
    for layer in sorted(moe_layers):
        files.update(card_layout.layer_files(cfg, layer, state))
    return files


def load_weight_file(model_dir: Path, rel: str, plain: bool = True) -> dict:
    """torch.load(weights_only=True) of model_dir/rel: tensors and plain containers, never
    code, from a plain file reached without a link (safe_path). plain: the file must be
    a state_dict ({name: tensor}); train_state.pt passes False (nested)."""
    path = Path(model_dir) / rel
    try:
        f = safe_path.open_read(model_dir, rel)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"model file {path} is missing; re-save the model or copy the file "
                        "back") from None
    try:
        with f, warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": keep one line
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for refused or broken files
        raise UserError(_load_failure(path, e)) from None
    if not isinstance(obj, dict) or (plain and not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise UserError(f"{path} does not hold a state_dict of tensors; replace it with a "
                        "file saved by himoe")
    if plain:  # NaN or inf weights would load and then break every forward pass
        bad = [k for k, v in obj.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(f"{path}: {', '.join(bad)} holds values that are not finite (NaN "
                            "or inf); restore the file from a backup or re-train")
    return obj


def _load_failure(path: Path, e: Exception) -> str:
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        # torch's message is a paragraph; the line naming the refused global is the news.
        detail = next((line.strip() for line in text.splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "")
        return (f"refused to load {path}: it is not plain weights and could run code when "
                f"unpickled{f' ({detail})' if detail else ''}; himoe loads only tensors, "
                "replace the file with one saved by himoe")
    first = text.splitlines()[0] if text else type(e).__name__
    return (f"cannot load {path} as plain weights ({first}); replace the file with one "
            "saved by himoe")


def from_files(model: HiMoEModel, model_dir: Path) -> None:
    """Fill `model` (already built from config.json) from the per-file layout."""
    cfg = model.cfg
    expected = model.state_dict()
    state = load_weight_file(model_dir, "backbone.pt")
    state["lm_head.weight"] = state.get("tok_emb.weight")
    for layer in range(cfg.n_layer):
        rel = card_layout.shared_expert_file(cfg, layer)
        # A directory saved before the shared expert had its own file keeps it in backbone.pt.
        if cfg.shared_hidden and safe_path.lstat(model_dir, rel) is not None:
            shared = dequantize_state(load_weight_file(model_dir, rel), rel)
            state.update({f"blocks.{layer}.shared_ffn.{k}": v for k, v in shared.items()})
    for layer in model.moe_layers:
        state.update(card_layout.layer_state(
            cfg, layer, expected, lambda rel: load_weight_file(model_dir, rel), str(model_dir)))
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            raise UserError(f"{model_dir}: weights for {key} are missing from backbone.pt; "
                            "re-save the model")
        if got.shape != want.shape:
            raise UserError(f"{model_dir}: {key} has shape {tuple(got.shape)} but config.json "
                            f"needs {tuple(want.shape)}; restore the matching file")
    model.load_state_dict({k: state[k] for k in expected})


# --- atomic writes: a crash leaves the old file or the new one, never half of one ---

def atomic_write_text(text: str, path: Path) -> None:
    safe_path.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# --- whole model directory ---

def check_model_dir_writable(model_dir: Path) -> None:
    """Checked before any work. Nothing is created here (the first save creates the
    directory), so a run that stops on bad input leaves nothing behind."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is a file; pass a directory path")
    existing = model_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--model_dir {model_dir} cannot be created because {existing} is a "
                        "file; pick a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir {model_dir} is not writable ({existing} does not allow "
                        "writing); pick a writable location")


def check_model_dir_flag(text: str) -> None:
    """An empty --model_dir (an unset shell variable) would mean the current directory."""
    if not str(text).strip():
        raise UserError("--model_dir is empty; name the folder for the model, e.g. "
                        "--model_dir model")


def model_dir_kind(model_dir: Path) -> tuple[str, list[str]]:
    """("missing" | "empty" | "model" | "other", the names that decided it). A himoe model
    directory has a manifest, a save in progress or a himoe config.json; himoe's own
    leftovers (the lock file, dead temporary files) do not count."""
    try:
        names = sorted(n for n in os.listdir(model_dir)
                       if n != atomic_dir.LOCK_FILE and not atomic_dir.is_dead_temp(n))
    except FileNotFoundError:
        return "missing", []
    if not names:
        return "empty", []
    if mf.MANIFEST_FILE in names or atomic_dir.STAGING_DIR in names:
        return "model", names
    try:
        meta = json.loads(safe_path.read_text(model_dir, CONFIG_FILE))
    except (OSError, UserError, ValueError):
        meta = None
    return ("model" if isinstance(meta, dict) and "himoe_format" in meta else "other"), names


def check_new_model_dir(model_dir: Path, force: bool) -> None:
    """A new model goes into a new or empty folder, or replaces a himoe model with --force;
    a folder of other files (a user's own config.json) is never written to."""
    kind, names = model_dir_kind(model_dir)
    if kind == "model" and not force:
        raise UserError(f"--model_dir {model_dir} already holds a himoe model; continue it "
                        "with --resume, or pass --force to replace it with a new one")
    if kind == "other":
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"--model_dir {model_dir} holds other files ({shown}) and is not a "
                        "himoe model directory; himoe never writes into such a folder (not "
                        "even with --force): pick a new or empty folder")


def new_model_dir_lock(model_dir: Path, force: bool,
                       acquire: bool = True) -> atomic_dir.WriterLock:
    """The writer lock of the directory a new model goes into, held when `acquire`. What
    would refuse the directory is checked before the lock file is made in it, and the
    overwrite check again under the lock."""
    check_new_model_dir(model_dir, force)
    if model_dir.exists():  # nothing planted that a save would write through
        safe_path.check_tree(model_dir)
    lock = atomic_dir.WriterLock(model_dir, create=True)
    if acquire:
        lock.acquire()
        try:
            check_new_model_dir(model_dir, force)
        except UserError:
            lock.release()
            raise
    return lock


def writing(model_dir: Path) -> atomic_dir.WriterLock:
    """The writer lock of an existing model directory, for a command that changes it (used
    as `with writing(d):`). Refused before the lock file is made when d is no model."""
    model_dir = Path(model_dir)
    check_is_model_dir(model_dir)
    if model_dir_kind(model_dir)[0] != "model":
        read_config_unlocked(model_dir)  # says what is missing or broken
    safe_path.check_tree(model_dir)
    return atomic_dir.WriterLock(model_dir)


def _say(note: str | None) -> None:
    if note:
        print(f"himoe: {note}", file=sys.stderr, flush=True)


def _torch_writer(obj):
    return lambda f: torch.save(obj, f)


def _bytes_writer(data: bytes):
    return lambda f: f.write(data)


def copy_writer(model_dir: Path, rel: str):
    """Writes the bytes of model_dir/rel, streamed: a file kept exactly as it is."""
    def write(f):
        with safe_path.open_read(model_dir, rel) as src:
            shutil.copyfileobj(src, f, 1 << 20)
    return write


def save_model(model: HiMoEModel, vocab: list[str], step: int, model_dir: Path,
               extra: dict[str, object] | None = None, keep: tuple[str, ...] = (),
               config: HiMoEConfig | None = None) -> None:
    """One atomic save of the weight files, `extra` ({name: object}: str or bytes are written
    as they are, anything else with torch.save; e.g. train_state.pt) and config.json: either
    all of them replace the previous save or none does. manifest.json records the set.
    keep: weight files copied byte for byte from model_dir instead of written from `model`
    (those --train_only leaves untouched; a quantised expert stays int8). config: what
    config.json records, the training and run settings included (default: the model's
    own settings, the rest at their defaults)."""
    model_dir = Path(model_dir)
    config = config if config is not None else HiMoEConfig(**dataclasses.asdict(model.cfg))
    writers = {name: _torch_writer(sd) for name, sd in to_files(model).items()}
    # A kept file the directory does not hold yet (a shared expert still inside backbone.pt,
    # from before it had a file of its own) is written from the model, whose weights it is.
    writers.update({name: copy_writer(model_dir, name) for name in keep
                    if safe_path.lstat(model_dir, name) is not None})
    for name, obj in (extra or {}).items():
        if isinstance(obj, str):
            obj = obj.encode("utf-8")
        writers[name] = _bytes_writer(obj) if isinstance(obj, bytes) else _torch_writer(obj)
    if model.cfg.tokenizer != "char" and TOKENIZER_FILE not in writers:
        writers[TOKENIZER_FILE] = copy_writer(model_dir, TOKENIZER_FILE)  # swap, quantize
    writers[CONFIG_FILE] = _bytes_writer(config_bytes(config, vocab, step))
    try:
        note = atomic_dir.save(model_dir, writers, step)
    except OSError as e:
        raise UserError(_save_failure(model_dir, step, e)) from None
    _say(note)


def config_bytes(cfg: HiMoEConfig, vocab: list[str], step: int) -> bytes:
    """config.json: the hyperparameters, the vocabulary and the saved step."""
    meta = {"himoe_format": FORMAT_VERSION, "step": step, "vocab": vocab,
            "config": cfg.to_dict()}
    return json.dumps(meta, indent=2).encode("utf-8")


def _save_failure(model_dir: Path, step: int, e: OSError) -> str:
    with contextlib.suppress(OSError):  # settle a save that failed after its commit point
        with atomic_dir.locked(model_dir):
            atomic_dir.recover(model_dir)
    kept = atomic_dir.saved_step(model_dir)
    reason = e.strerror or str(e) or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    hint = ("free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the directory's permissions and free space")
    if kept is not None:
        return (f"saving step {step} to {model_dir} failed: {reason}{where}; the complete "
                f"save of step {kept} is kept, {hint} and continue with --resume")
    return (f"saving step {step} to {model_dir} failed: {reason}{where}; no earlier save "
            f"exists, {hint} and train again")


def recover_model_dir(model_dir: Path) -> None:
    """Finish or discard a save that a crash interrupted, saying so in one line."""
    model_dir = Path(model_dir)
    with atomic_dir.locked(model_dir):
        recover_locked(model_dir)


def recover_locked(model_dir: Path) -> None:
    try:
        _say(atomic_dir.recover(model_dir))
    except OSError as e:
        raise UserError(f"{model_dir} holds an interrupted save that cannot be repaired "
                        f"({e.strerror or e}); make the directory writable and run "
                        f"`himoe verify --model_dir {model_dir}`") from None


def check_is_model_dir(model_dir: Path) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is a file, not a model directory; pass the "
                        "directory that `himoe train` wrote")
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist; train one first with "
                        f"`himoe train --model_dir {model_dir}`")


def read_config(model_dir: Path) -> tuple[HiMoEConfig, list[str], int]:
    model_dir = Path(model_dir)
    check_is_model_dir(model_dir)
    with atomic_dir.locked(model_dir):
        recover_locked(model_dir)
        return read_config_unlocked(model_dir)


def read_config_unlocked(model_dir: Path) -> tuple[HiMoEConfig, list[str], int]:
    path = model_dir / CONFIG_FILE
    if safe_path.lstat(model_dir, CONFIG_FILE) is None:
        raise UserError(f"{path} is missing; {model_dir} is not a himoe model directory")
    try:
        meta = json.loads(safe_path.read_text(model_dir, CONFIG_FILE))
        cfg = HiMoEConfig.from_dict(meta["config"])
        vocab, step = meta["vocab"], meta["step"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            ValueError) as e:
        raise UserError(f"{path} is broken ({type(e).__name__}: {e}); restore it from a "
                        "backup or re-train") from None
    cfg.validate(origin=path)  # each value's type and range, before anything is allocated
    cfg = cfg.read_as_format(meta.get("himoe_format", 1))
    if type(step) is not int or step < 0:
        raise UserError(f"{path}: step must be an integer >= 0, got {json.dumps(step)}; "
                        "restore the file from a backup")
    if not isinstance(vocab, list) or not vocab or \
            not all(isinstance(c, str) and c for c in vocab) or len(set(vocab)) != len(vocab):
        raise UserError(f"{path}: the vocabulary must be a list of distinct non-empty strings; "
                        "restore the file")
    if cfg.vocab_size != len(vocab):
        raise UserError(f"{path}: vocab_size {cfg.vocab_size} does not match the "
                        f"{len(vocab)}-entry vocabulary; restore the file")
    return cfg, vocab, step


def load_model(model_dir: Path, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, settle: bool = True):
    """(model, cfg, vocab, step) from a modular checkpoint; nothing is unpickled. The lock
    keeps a concurrent save from replacing files half-way through the read. config: the
    settings to build the model with instead of the saved ones (a resumed run's flags),
    with the saved shape (the weight files must fit it). settle: first finish or discard a
    save that a crash interrupted (False: a reader that must never write, `himoe view`)."""
    model_dir = Path(model_dir)
    check_is_model_dir(model_dir)
    with atomic_dir.locked(model_dir):
        if settle:
            recover_locked(model_dir)
        cfg, vocab, step = read_config_unlocked(model_dir)
        model = HiMoEModel(config if config is not None else cfg)
        try:
            from_files(model, model_dir)
        except (RuntimeError, TypeError, ValueError) as e:  # files that do not fit together
            text = str(e).strip()
            first = text.splitlines()[0] if text else ""
            raise UserError(f"the files in {model_dir} do not match its config.json "
                            f"({type(e).__name__}: {first}); restore them, and run `himoe "
                            f"verify --model_dir {model_dir}` to see which") from None
    return model.to(device), cfg, vocab, step


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of the model saved in model_dir (config.json, and tokenizer.json for BPE)."""
    cfg, vocab, _ = read_config(Path(model_dir))
    return tokenizer_for(cfg, vocab, Path(model_dir))


def read_metrics(model_dir: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step` (a resumed run appends after them); lines
    that do not parse are dropped, so a torn line from an old crash cannot stay."""
    try:
        lines = safe_path.read_text(model_dir, METRICS_FILE).splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and \
                entry["step"] <= step:
            kept.append(line + "\n")
    return kept
