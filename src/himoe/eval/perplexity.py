"""Loss, perplexity and bits per byte of a model on any text (`himoe eval`).

The whole text is read once, in non-overlapping windows of block_size tokens (the documents
of a directory or glob one after another), so the figure is exact rather than sampled:

    loss          = total nats / predicted tokens
    bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text

Bits per byte does not depend on the tokenizer, so char and BPE models compare on it.
The routing of every token gives the balance figures of himoe.analysis.balance.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from himoe.analysis.balance import load_figures
from himoe.data.documents import encode_documents
from himoe.data.shards import PreparedCorpus
from himoe.errors import UserError
from himoe.training.device import autocast


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of each window: every token but the first is predicted exactly once."""
    return [(start, min(block_size, n_tokens - 1 - start))
            for start in range(0, n_tokens - 1, block_size)]


def evaluate_text(model, tokenizer, corpus, batch_size: int, device, dtype) -> dict:
    cfg = model.cfg
    if isinstance(corpus, PreparedCorpus):  # tokenised already, by the model's tokenizer
        corpus.check_tokenizer(tokenizer)
        ids, kept_bytes, n_docs = corpus.all_tokens(), corpus.manifest["bytes"], \
            corpus.manifest["documents"]
        skipped_chars = 0
    else:
        kept = [tokenizer.drop_unknown(t)[0] for t in corpus.texts]
        ids = torch.cat(encode_documents(corpus, tokenizer, drop_unknown=True))
        kept_bytes, n_docs = sum(len(t.encode("utf-8")) for t in kept), len(corpus.texts)
        skipped_chars = sum(len(t) for t in corpus.texts) - sum(len(t) for t in kept)
    if len(ids) < 2:
        raise UserError(f"--data_file {corpus.source} has fewer than 2 tokens the model knows; "
                        "pass a longer text")
    spans = windows(len(ids), cfg.block_size)
    counts = {i: torch.zeros(cfg.total_experts, dtype=torch.long) for i in model.moe_layers}
    total_nats, predicted = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), tqdm(total=len(spans), desc="eval", unit="window", file=sys.stderr,
                               dynamic_ncols=True, mininterval=0.5) as bar:
        # Full windows go in batches; the last, shorter one (if any) on its own.
        S = cfg.block_size
        full = [start for start, length in spans if length == S]
        batches = [(full[i:i + batch_size], S) for i in range(0, len(full), batch_size)]
        if spans[-1][1] < S:
            batches.append(([spans[-1][0]], spans[-1][1]))
        for starts, length in batches:
            # take: a tensor's elements, or a prepared corpus's read from its shards
            pos_BT = torch.tensor(starts).unsqueeze(1) + torch.arange(length)
            x_BT, y_BT = ids.take(pos_BT).to(device), ids.take(pos_BT + 1).to(device)
            with autocast(device, dtype):
                logits_BTV, _ = model(x_BT)
            nats = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(),
                                   reduction="sum")
            total_nats += float(nats)
            predicted += y_BT.numel()
            for i, layer in model.moe_layers.items():
                counts[i] += torch.bincount(layer.last_ids_TK.reshape(-1).cpu(),
                                            minlength=cfg.total_experts)
            bar.update(len(starts))
    model.train(was_training)
    # The first token is context only: its bytes are not predicted.
    first = tokenizer.decode(ids.take(torch.tensor([0])).tolist())
    n_bytes = kept_bytes - len(first.encode("utf-8"))
    loss = total_nats / predicted
    return {"data_file": corpus.source, "documents": n_docs, "tokens": len(ids),
            "predicted_tokens": predicted, "bytes": n_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": total_nats / math.log(2) / max(1, n_bytes),
            "skipped_chars": skipped_chars,
            "layers": [load_figures(counts[i], cfg.num_moes) for i in sorted(counts)]}
