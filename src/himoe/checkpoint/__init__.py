"""A saved model on disk: the card layout, atomic saves, manifest, verification, quantised
files and the path safety every read and write inside a model directory goes through."""
