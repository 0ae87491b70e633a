"""The tokenizers a model can have (a saved model's: himoe.checkpoint.card.load_tokenizer).

- "char" (the card's): one token per character; the vocabulary lives in config.json.
- "bpe": byte-level BPE trained with the `tokenizers` library on the training documents and
  saved as tokenizer.json (that library's own format, so Hugging Face tools read it as is).
  Every byte is in its alphabet, so no text is ever refused.

Both share one interface: vocab (the id-ordered token strings kept in config.json),
vocab_size, encode, decode, unknown, drop_unknown, blank_token and files() (what the atomic
save writes besides the weights).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from himoe.checkpoint import safe_path
from himoe.config import TOKENIZERS
from himoe.errors import UserError

CHUNK_CHARS = 1 << 20  # text handed to the tokenizer at once, so the bar moves
# Where a byte-level BPE pre-token (GPT-2's pattern) always ends, so that pieces cut there
# tokenise exactly like the whole text: after a newline followed by a non-space character,
# and before a space between two non-space characters (a space followed by a non-space
# starts a pre-token, " word", and no pattern takes a space at the end). The second kind
# lets a long line, or a record with no newline at all, be cut too.
_CUT = re.compile(r"\n(?=\S)|(?<=\S)(?= \S)")

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"  # the BPE vocabulary's one special token (for exports)
BYTE_ALPHABET = 256


class CharTokenizer:
    """One token per character; the vocabulary is saved in config.json."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def vocab(self) -> list[str]:
        return self.chars

    def files(self) -> dict[str, str]:
        return {}  # the vocabulary is config.json's "vocab"

    def unknown(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self.index})

    def drop_unknown(self, text: str) -> tuple[str, list[str]]:
        """(text without the characters outside the vocabulary, those characters)."""
        missing = self.unknown(text)
        gone = set(missing)
        return "".join(c for c in text if c not in gone), missing

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise UserError(f"text has characters outside the model's vocabulary: "
                            f"{show_chars(missing)}; remove them or train on a corpus that has "
                            "them")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def blank_token(self) -> int:
        """The card's 'blank context': a newline where the vocabulary has one."""
        return self.index.get("\n", 0)


def show_chars(chars: list[str], limit: int = 20) -> str:
    """Characters as a readable list: repr makes tabs, odd spaces and controls visible."""
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")



class BPETokenizer:
    """Byte-level BPE: a thin wrapper over tokenizers.Tokenizer with the char interface."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        self.vocab = [token for token, _ in by_id]
        self.blank = tokenizer.encode("\n").ids[0]

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        minimum = BYTE_ALPHABET + 1
        if vocab_size < minimum:
            raise UserError(f"--vocab_size {vocab_size} is too small for byte-level BPE: it "
                            f"needs at least {minimum} (256 bytes + {END_OF_TEXT}); pass a "
                            "larger one, e.g. 2048")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        # The trainer breaks count ties by pair order, so the same texts give the same merges.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str, source: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # the library raises plain Exceptions for a malformed file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{source} is not a tokenizer file the tokenizers library can "
                            f"read ({first}); restore it from the saved model") from None

    def to_json(self) -> str:
        return self.tok.to_str()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unknown(self, text: str) -> list[str]:
        return []  # every byte has a token

    def drop_unknown(self, text: str) -> tuple[str, list[str]]:
        return text, []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        # A token may hold part of a multi-byte character: decoded alone it shows as U+FFFD.
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def blank_token(self) -> int:
        return self.blank

    def files(self) -> dict[str, str]:
        return {TOKENIZER_FILE: self.to_json()}


def train_tokenizer(kind: str, corpus, bpe_vocab_size: int):
    """A new tokenizer of `kind` for a corpus (himoe.data.documents.Corpus). The character
    vocabulary covers every document, as the card's does (validation text must encode);
    BPE is fitted to the training side only."""
    if kind == "char":
        return CharTokenizer(sorted(set().union(*map(set, corpus.texts))))
    if kind == "bpe":
        return BPETokenizer.train(corpus.tokenizer_texts(), bpe_vocab_size)
    raise UserError(f"--tokenizer {kind!r} is not one of {', '.join(TOKENIZERS)}")


def tokenizer_for(cfg, vocab: list[str], model_dir: Path):
    """The tokenizer of a saved model whose config.json has been read (cfg, vocab)."""
    if cfg.tokenizer == "char":
        return CharTokenizer(vocab)
    path = Path(model_dir) / TOKENIZER_FILE
    try:
        text = safe_path.read_text(model_dir, TOKENIZER_FILE)  # never through a link
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"{path} cannot be read ({reason}); a BPE model needs its "
                        "tokenizer.json, restore it from the saved model") from None
    tok = BPETokenizer.from_json(text, path)
    if tok.vocab != list(vocab):
        raise UserError(f"{path} does not match the vocabulary in config.json "
                        f"({tok.vocab_size} against {len(vocab)} tokens); restore both from "
                        "the same save")
    return tok


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """text cut into pieces of about `size` characters, only where a cut changes no token."""
    return list(iter_chunks(text, size))


def iter_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """chunks, one piece at a time: a long text is never copied whole."""
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]
