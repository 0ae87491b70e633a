"""Token ids into training: the train/validation split and the random training batches."""

from __future__ import annotations

import torch

from himoe.data.documents import Corpus
from himoe.errors import UserError


def train_tokens(n: int, val_fraction: float = 0.1) -> int:
    """How many of a one-document corpus's n tokens train (the first ones)."""
    return n - int(n * val_fraction)


def split_train_val(ids: torch.Tensor, block_size: int, val_fraction: float = 0.1):
    """First 90% for training, last 10% for validation: contiguous, so no text leaks."""
    cut = train_tokens(len(ids), val_fraction)
    train, val = ids[:cut], ids[cut:]
    need = block_size + 1
    if len(train) < need or len(val) < need:
        raise UserError(f"corpus of {len(ids)} tokens is too short for --block_size {block_size}: "
                        f"each of the 90/10 splits needs at least {need} tokens; use a longer "
                        f"corpus (about {10 * need} characters) or a smaller --block_size")
    return train, val


def split_documents(corpus: Corpus, docs: list[torch.Tensor], block_size: int):
    """(train ids, validation ids): the card's contiguous split for one document, whole
    documents to validation for several."""
    if len(docs) == 1:
        return split_train_val(docs[0], block_size)
    val_idx = set(corpus.val_indices())
    train = torch.cat([d for i, d in enumerate(docs) if i not in val_idx])
    val = torch.cat([d for i, d in enumerate(docs) if i in val_idx])
    check_split_sizes(corpus.source, len(train), len(val), block_size)
    return train, val


def check_split_sizes(source: str, n_train: int, n_val: int, block_size: int) -> None:
    need = block_size + 1
    if n_train < need or n_val < need:
        raise UserError(f"--data_file {source}: the training documents have "
                        f"{n_train} tokens and the validation ones {n_val}, but each side "
                        f"needs at least {need} for --block_size {block_size}; add text or use "
                        "a smaller --block_size")


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens; the generator's state is the data position."""
    ix_B = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets_T = torch.arange(block_size + 1)
    # take: a tensor's elements, or a prepared corpus's (himoe.data.shards.TokenView)
    window_BT = data.take(ix_B.unsqueeze(1) + offsets_T)
    return window_BT[:, :-1], window_BT[:, 1:]
