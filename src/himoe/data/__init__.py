"""Training text: documents, tokenizers and batches; also ships hamlet.txt."""
