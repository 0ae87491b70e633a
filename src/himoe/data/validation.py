"""The validation split a saved model was trained on, for evaluating it after the fact."""

from __future__ import annotations

from pathlib import Path

import torch

from himoe.config import HiMoEConfig
from himoe.data.batches import split_documents
from himoe.data.corpora import open_corpus, token_splits
from himoe.data.documents import encode_documents
from himoe.data.shards import PreparedCorpus


def validation_split(cfg: HiMoEConfig, tokenizer,
                     data_file: str | Path | None = None) -> tuple[torch.Tensor, str, int]:
    """(validation token ids, corpus label, characters dropped). The corpus is data_file, else
    the one saved in config.json, else the shipped Hamlet; it is split as training split it.
    Characters a character-level model does not know are dropped (and counted) rather than
    refused: the figures stay meaningful. A prepared corpus must have the model's tokenizer."""
    corpus = open_corpus(data_file if data_file is not None else cfg.data_file)
    if isinstance(corpus, PreparedCorpus):
        return token_splits(corpus, tokenizer, cfg.block_size)[1], corpus.source, 0
    docs = encode_documents(corpus, tokenizer, drop_unknown=True)
    dropped = sum(len(t) - len(tokenizer.drop_unknown(t)[0]) for t in corpus.texts)
    _, val = split_documents(corpus, docs, cfg.block_size)
    return val, corpus.source, dropped
