"""Changing a saved model in place: naming its parts, swapping them and adding experts."""
