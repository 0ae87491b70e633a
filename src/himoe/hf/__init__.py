"""Hugging Face export: `himoe export-hf` (export.py). configuration_himoe.py and
modeling_himoe.py are the remote-code files the export ships; they import transformers,
so nothing here imports them."""
