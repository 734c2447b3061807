"""Decoding speed of the full-size AiT transformer (random weights): tokens per second.

  python -m ait_jax.bench_decode [--memory 15 20] [--batch 1 8] [--tokens 225]

Autoregressive depth decoding (soft tokens, greedy, KV cache in one compiled loop)
against AiT-P's single pass, on the default JAX device; compile time is excluded.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from ait_jax.models import decoding
from ait_jax.models.transformer import DEPTH_TASK, ARTransformer
from ait_jax.models.vocab import Vocab

# The released depth configs (swinv2b_480reso_depthonly and its parallel twin).
VOCAB = Vocab(num_bins=2000, num_classes=80, num_mask_codes=128, num_depth_codes=128,
              size=2339)
FULL_SIZE = dict(vocab=VOCAB, in_chans=1024, d_model=256, num_heads=8,
                 num_encoder_layers=6, num_decoder_layers=6, mlp_dim=1024,
                 dec_length=2100, top_p=0.0)


def _tokens_per_second(model: ARTransformer, batch: int, side: int, tokens: int,
                       repeats: int) -> float:
  src = jax.random.normal(jax.random.key(0), (batch, side, side, model.in_chans))
  variables = jax.jit(model.init)(jax.random.key(1), src,
                                  jnp.zeros((batch, 1), jnp.int32),
                                  jnp.full((batch,), DEPTH_TASK))
  decode = jax.jit(lambda v, s: model.apply(v, s, pred_len=tokens,
                                            method=decoding.decode_depth))
  jax.block_until_ready(decode(variables, src))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    out = decode(variables, src)
  jax.block_until_ready(out)
  return batch * tokens * repeats / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--memory", type=int, nargs="+", default=[15],
                      help="side of the square memory (feature map) in tokens")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--tokens", type=int, default=225)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, {args.tokens} depth tokens")
  for side in args.memory:
    modes = (("AR (soft tokens)", ARTransformer(**FULL_SIZE, n_rows=side, n_cols=side,
                                                soft_transformer=True)),
             ("AiT-P (one pass)", ARTransformer(**FULL_SIZE, n_rows=side, n_cols=side,
                                                parallel=True)))
    for name, model in modes:
      for batch in args.batch:
        rate = _tokens_per_second(model, batch, side, args.tokens, args.repeats)
        print(f"{name:18s} memory {side}x{side}  batch {batch:3d}: "
              f"{rate:12.1f} tokens/s")


if __name__ == "__main__":
  main()
