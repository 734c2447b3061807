"""Flax linen modules of AiT. Imports nothing from the rest of the package.

Every parameter carries logical axis names (see `ait_jax.models.axes`).
"""
