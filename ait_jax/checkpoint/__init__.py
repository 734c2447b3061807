"""Persistence: orbax checkpoints and the PyTorch (reference) weight mapping."""
