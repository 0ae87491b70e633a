"""The validation split a saved model was trained on, for evaluating it after the fact."""

from __future__ import annotations

from pathlib import Path

import torch

from himoe.config import HiMoEConfig
from himoe.data.corpus import CharTokenizer, load_corpus, split_train_val


def validation_split(cfg: HiMoEConfig, vocab: list[str],
                     data_file: str | Path | None = None) -> tuple[torch.Tensor, Path, int]:
    """(validation token ids, corpus path, characters dropped). The corpus is data_file, else
    the one saved in config.json, else the shipped Hamlet. Characters the model does not
    know are dropped (and counted) rather than refused: the figures stay meaningful."""
    text, path = load_corpus(data_file if data_file is not None else cfg.data_file)
    tok = CharTokenizer(vocab)
    kept, missing = tok.drop_unknown(text)
    ids = torch.tensor(tok.encode(kept), dtype=torch.long)
    _, val = split_train_val(ids, cfg.block_size)
    return val, path, len(text) - len(kept)
