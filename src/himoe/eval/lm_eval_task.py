"""A local lm-evaluation-harness perplexity task for the text `himoe eval` reads.

`himoe eval --lm_eval_task DIR` writes DIR/himoe_text.jsonl (one document a line) and
DIR/himoe_text.yaml, a loglikelihood_rolling task over it (word and byte perplexity, bits per
byte), so an exported Hugging Face model can be scored offline on exactly the same documents:

    lm_eval --model hf --model_args pretrained=EXPORT_DIR --include_path DIR \
            --tasks himoe_text --device cpu --batch_size 1
"""

from __future__ import annotations

import json
from pathlib import Path

from himoe.checkpoint.card import atomic_write_text

TASK_NAME = "himoe_text"


def task_yaml(data_path: Path) -> str:
    # JSON strings are valid YAML scalars, so the path needs no escaping of its own.
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_path.absolute()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        ""])


def write_task(corpus, out_dir: Path) -> list[Path]:
    """The task files for `corpus` (himoe.data.documents.Corpus) in out_dir."""
    out_dir = Path(out_dir)
    data = out_dir / f"{TASK_NAME}.jsonl"
    config = out_dir / f"{TASK_NAME}.yaml"
    atomic_write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.texts), data)
    atomic_write_text(task_yaml(data), config)
    return [config, data]
