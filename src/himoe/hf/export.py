"""`himoe export-hf`: a himoe model directory -> a directory that transformers loads.

    HFDIR/
        config.json               HimoeConfig fields, model_type "himoe", auto_map (the .py files)
        configuration_himoe.py    the config class (remote code)
        modeling_himoe.py         the model in plain torch (remote code; never imports himoe)
        model.safetensors         fp32 weights under himoe's own names (int8 experts dequantised)
        generation_config.json    bos_token_id: the blank token a prompt-less generate() starts from
        tokenizer.json            the tokenizer (characters, or the model's own BPE file)
        tokenizer_config.json     PreTrainedTokenizerFast over tokenizer.json

AutoModelForCausalLM.from_pretrained(HFDIR, trust_remote_code=True) and
AutoTokenizer.from_pretrained(HFDIR) load it. Writing it needs torch, safetensors and
tokenizers, not transformers. HFDIR is written whole under a temporary name and renamed.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import stat
import time
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from himoe.checkpoint import safe_path
from himoe.checkpoint.atomic_dir import WriterLock, is_dead_temp
from himoe.config import HiMoEConfig
from himoe.errors import UserError
from himoe.hf.tokenizer import TOKENIZER_FILE, model_tokenizer_json
from himoe.model.routers.registry import router_spec

REMOTE_FILES = ("configuration_himoe.py", "modeling_himoe.py")
WEIGHTS_FILE = "model.safetensors"


def hf_config(cfg: HiMoEConfig, blank: int) -> dict:
    """config.json of the export: what HimoeConfig needs, and where transformers finds it.
    blank: himoe's "blank context" token (a newline), where generation starts."""
    return {
        "architectures": ["HimoeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_himoe.HimoeConfig",
                     "AutoModelForCausalLM": "modeling_himoe.HimoeForCausalLM"},
        "model_type": "himoe",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "block_size": cfg.block_size, "num_moes": cfg.num_moes,
        "num_experts": cfg.num_experts, "top_k_groups": cfg.top_k_groups,
        "top_k_experts": cfg.top_k_experts, "expert_hidden": cfg.ffn_hidden,
        "shared_expert": cfg.shared_hidden,
        "router": router_spec(cfg.router).hf_name, "renormalize": cfg.renormalize,
        "router_temp": cfg.router_temp,
        "capacity_factor": cfg.capacity_factor, "group_experts": cfg.group_experts,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": blank, "use_cache": True,
        "torch_dtype": "float32",
    }


def generation_config(blank: int) -> dict:
    # A prompt-less generate() starts from the blank token, as `himoe generate` does.
    return {"bos_token_id": blank}


def tokenizer_config(cfg: HiMoEConfig) -> dict:
    # No cleanup: it would remove spaces before punctuation, and the decoded text must be
    # exactly what himoe decodes.
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
            "clean_up_tokenization_spaces": False}


def is_export(path: Path) -> bool:
    """A directory this command wrote before (so --out may replace it without --force)."""
    try:  # never through a link: an export is as untrusted as a model directory
        meta = json.loads(safe_path.read_text(path, "config.json"))
        remote = safe_path.lstat(path, "modeling_himoe.py")
    except (OSError, ValueError, UserError):
        return False
    return isinstance(meta, dict) and meta.get("model_type") == "himoe" and remote is not None


def check_out(out: Path, force: bool) -> None:
    if out.is_symlink():  # replacing it would put a folder in the link's place
        raise UserError(f"--out {out} is a symbolic link; pass the folder it points to, "
                        f"{os.path.realpath(out)}, or another path")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not is_export(out) and not force:
        raise UserError(f"--out {out} is a non-empty directory that is not a himoe export; "
                        "pick another path, or pass --force to replace it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable; pick a writable location")


def weights(model) -> dict:
    """The tensors of the export: every persistent tensor but the tied LM head (the
    embedding is read in its place) and the router's training-only state (e.g. the grouped
    router's logit EMA, which corrects its selection in training, never at inference)."""
    training_only = tuple(f"router.{name}"
                          for name in router_spec(model.cfg.router).hf_training_only)
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
            if k != "lm_head.weight" and not k.endswith(training_only)}


def write_export(tmp: Path, model, cfg: HiMoEConfig, blank: int, tokenizer: str,
                 bar) -> int:
    """Write every file of the export into tmp; returns the number of parameters."""
    from safetensors.torch import save_file

    tmp.mkdir()
    bar.set_postfix_str(WEIGHTS_FILE)
    tensors = weights(model)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    bar.update()
    texts = {"config.json": hf_config(cfg, blank),
             "generation_config.json": generation_config(blank),
             "tokenizer_config.json": tokenizer_config(cfg)}
    for name, data in texts.items():
        (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (tmp / TOKENIZER_FILE).write_text(tokenizer, encoding="utf-8")
    for name in REMOTE_FILES:
        (tmp / name).write_bytes(resources.files("himoe.hf").joinpath(name).read_bytes())
    bar.set_postfix_str("sync")
    for path in tmp.iterdir():  # durable before the rename makes the export visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    bar.update()
    return sum(t.numel() for t in tensors.values())


def replace_dir(tmp: Path, out: Path) -> None:
    """Put tmp in out's place; an old out is moved aside first and deleted after."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists():
            os.rename(old, out)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_dead_leftovers(out: Path) -> None:
    """The .OUT.tmp-PID and .OUT.old-PID folders of exports to out that were killed."""
    for path in out.absolute().parent.glob(f".{glob.escape(out.name)}.*-*"):
        if is_dead_temp(path.name) and stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)  # never follows a link inside


def export_hf(model_dir: Path, out: Path, force: bool = False) -> dict:
    """Write the export of model_dir to out; returns a summary for the command line."""
    from himoe.checkpoint.card import load_model, read_config
    from himoe.data.tokenizers import tokenizer_for

    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    check_out(out, force)
    if model_dir.resolve() == out.resolve() or out.resolve() in model_dir.resolve().parents:
        raise UserError(f"--out {out} would replace the model directory {model_dir}; pick a "
                        "path outside it")
    cfg, vocab, _ = read_config(model_dir)  # bad input stops here, before the bar starts
    if router_spec(cfg.router).hf_name is None:
        raise UserError(f"{model_dir} uses the {cfg.router!r} router, which modeling_himoe.py "
                        "cannot rebuild; only the built-in routers export to Hugging Face")
    safe_path.check_tree(model_dir)  # a link or FIFO would stop the load half-way
    tokenizer = model_tokenizer_json(model_dir, vocab, cfg.vocab_size)
    # Three steps of similar length for a card-size model: read the expert files, write
    # the weights, make them durable.
    # One export to out at a time; the lock file sits beside out, and goes with the lock.
    lock = WriterLock(out.absolute().parent, f".{out.name}.himoe-lock", remove=True,
                      flag="--out", shown=out)
    # disable=None: no bar where stderr is not a terminal, so a log holds only the result.
    with lock, tqdm(total=3, desc="export-hf", unit="step", leave=False, disable=None) as bar:
        bar.set_postfix_str("load")
        model, cfg, vocab, step = load_model(model_dir)
        bar.update()
        remove_dead_leftovers(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        existed = out.exists()
        try:
            blank = tokenizer_for(cfg, vocab, model_dir).blank_token()
            n_params = write_export(tmp, model, cfg, blank, tokenizer, bar)
            replace_dir(tmp, out)
        except OSError as e:  # e.g. a full disk: the half-written tmp goes, out stays as it was
            kept = f"{out} is unchanged" if existed else f"nothing was written to {out}"
            hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
                "check the permissions and free space"
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"writing the export failed: {e.strerror or e}{where}; {kept}, "
                            f"{hint} and run export-hf again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "step": step, "params": n_params, "router": cfg.router,
            "bytes": (out / WEIGHTS_FILE).stat().st_size,
            "seconds": time.perf_counter() - start}
