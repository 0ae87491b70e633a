"""Evaluating a saved model: perplexity on held-out text and an lm-evaluation-harness task."""
