"""--data_file of either kind, for training and evaluation: documents read into memory
(himoe.data.documents) or a directory `himoe prepare` wrote (himoe.data.shards), which is
read through memory maps and keeps the tokenizer it was prepared with."""

from __future__ import annotations

from himoe.data.batches import split_documents
from himoe.data.documents import Corpus, encode_documents, load_documents
from himoe.data.shards import PreparedCorpus, is_prepared
from himoe.data.tokenizers import train_tokenizer


def open_corpus(spec) -> Corpus | PreparedCorpus:
    return PreparedCorpus(spec) if is_prepared(spec) else load_documents(spec)


def new_tokenizer(cfg, corpus: Corpus | PreparedCorpus):
    """A new model's tokenizer: fitted to the documents, or the prepared one (whose kind
    then overrides cfg.tokenizer)."""
    if isinstance(corpus, PreparedCorpus):
        return corpus.tokenizer()
    return train_tokenizer(cfg.tokenizer, corpus, cfg.bpe_vocab_size)


def unknown_chars(corpus: Corpus | PreparedCorpus, tokenizer) -> list[str]:
    """Characters of the corpus a saved model's tokenizer lacks (a prepared corpus must have
    been tokenised by that very tokenizer, else UserError)."""
    if isinstance(corpus, PreparedCorpus):
        corpus.check_tokenizer(tokenizer)
        return []
    return sorted(set().union(*(tokenizer.unknown(t) for t in corpus.texts)))


def token_splits(corpus: Corpus | PreparedCorpus, tokenizer, block_size: int):
    """(train, validation) token ids: tensors, or views of a prepared corpus's shards; the
    same ids and so the same batches either way."""
    if isinstance(corpus, PreparedCorpus):
        corpus.check_tokenizer(tokenizer)
        return corpus.splits(block_size)
    return split_documents(corpus, encode_documents(corpus, tokenizer), block_size)
