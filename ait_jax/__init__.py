"""ait-jax: AiT (All in Tokens, arXiv 2301.02229) in JAX/Flax."""
