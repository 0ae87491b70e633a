"""The tokenizer of an export, as a `tokenizers` Tokenizer (tokenizer.json).

A character-level himoe model gets a WordLevel tokenizer over its single characters: the
pre-tokenizer cuts the text into characters, there is no normaliser, and the decoder joins
the tokens with nothing in between, so ids match CharTokenizer exactly. A model directory
that holds its own tokenizer.json (the byte-level BPE option) is exported with that file.
"""

from __future__ import annotations

import json
from pathlib import Path

from himoe.checkpoint import safe_path
from himoe.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


def char_tokenizer_json(vocab: list[str]) -> str:
    """tokenizer.json text for himoe's character vocabulary (id = position in vocab)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    long = [c for c in vocab if len(c) != 1]
    if long:
        raise UserError(f"the vocabulary in config.json has entries that are not single "
                        f"characters ({long[:3]!r}); a character model's vocabulary must hold "
                        "one character per entry")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)}))
    # Any one character, newlines included (Oniguruma's "." skips them): one token each.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str(pretty=True)


def model_tokenizer_json(model_dir: Path, vocab: list[str], vocab_size: int) -> str:
    """The tokenizer.json text an export of model_dir ships."""
    path = Path(model_dir) / TOKENIZER_FILE
    meta = json.loads(safe_path.read_text(model_dir, "config.json"))
    kind = meta.get("tokenizer", meta.get("config", {}).get("tokenizer", "char"))
    if safe_path.lstat(model_dir, TOKENIZER_FILE) is None:
        if kind != "char":
            raise UserError(f"{model_dir}/config.json names the {kind!r} tokenizer but "
                            f"{path} is missing; copy the model's tokenizer.json back")
        return char_tokenizer_json(vocab)
    from tokenizers import Tokenizer

    text = safe_path.read_text(model_dir, TOKENIZER_FILE)
    try:
        size = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own Exception type for a broken file
        raise UserError(f"{path} is not a valid tokenizers file ({e}); restore it") from None
    if size > vocab_size:
        raise UserError(f"{path} has {size} tokens but the model only {vocab_size}; it is "
                        "not this model's tokenizer, restore the right file")
    return text
