"""Training: the loop, optimiser, freezing, memory checks and logging."""
