"""Benchmark of a config's compiled train step on the available devices.

  python -m ait_jax.bench --config configs/X.py [--config.a.b=value ...] [--steps 10]

Prints the compile time, the step time, images per second, the step's FLOPs from XLA's
cost analysis and the resulting utilisation of the devices' peak. The batch is random
data of the config's shapes and the tokenizers are random (nothing is read from disk),
so only the compiled computation is measured.
"""

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device (default: "
                           "from the device kind, for the compute dtype).")
flags.mark_flag_as_required("config")

# Dense peak TFLOP/s per device: (bfloat16, float32).
PEAK_TFLOPS = {
    "TPU v4": (275.0, 275.0 / 4), "TPU v5 lite": (197.0, 197.0 / 4),
    "TPU v5e": (197.0, 197.0 / 4), "TPU v5p": (459.0, 459.0 / 4),
    "TPU v6 lite": (918.0, 918.0 / 4), "NVIDIA H100": (989.0, 67.0),
    "NVIDIA H200": (989.0, 67.0), "NVIDIA A100": (312.0, 19.5),
}


def peak_tflops(device, dtype: str) -> float | None:
  for kind, (bf16, f32) in PEAK_TFLOPS.items():
    if device.device_kind.startswith(kind):
      return bf16 if dtype == "bfloat16" else f32
  return None


def _random_batch(exp, mesh, rng):
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  batch = {}
  for i, (name, task) in enumerate(exp.tasks.items()):
    shapes = task.example_batch(task.task_cfg.batch_size)
    batch[name] = {
        k: jax.random.uniform(jax.random.fold_in(rng, 10 * i + j), s.shape, s.dtype,
                              0.5 if k in ("depth", "masked_depth") else 0.0,
                              10.0 if k in ("depth", "masked_depth") else 1.0)
        for j, (k, s) in enumerate(sorted(shapes.items()))}
  return jax.device_put(batch, sharding.batch_sharding(mesh))


def _random_frozen(exp, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from ait_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  values, shardings = {}, {}
  rep = sharding.replicated(mesh)
  tokenizers = exp.ref.tokenizers if hasattr(exp, "ref") else {}
  for task, tok in tokenizers.items():
    if task not in exp.tasks:
      continue
    v = nn.meta.unbox(tok.init(jax.random.key(1), jnp.zeros(
        (1, tok.mask_size, tok.mask_size), jnp.float32)))
    values[task] = jax.device_put({k: v[k] for k in ("params", "vq")}, rep)
    shardings[task] = jax.tree.map(lambda _: rep, values[task])
  return values, shardings


def benchmark(cfg, steps: int, peak: float = 0.0) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from ait_jax.train import experiment, trainer  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.mesh_from_config(cfg.mesh)
  exp = experiment.make_experiment(cfg, "/tmp/ait_jax_bench", mesh)
  factory = trainer.StateFactory(exp, cfg, mesh)
  frozen, frozen_shardings = _random_frozen(exp, mesh)
  state = factory.create()
  batch = _random_batch(exp, mesh, jax.random.key(0))
  step = trainer.compile_train_step(exp, factory, cfg, frozen_shardings)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  images = sum(t.task_cfg.batch_size for t in exp.tasks.values())
  peak = peak or peak_tflops(jax.devices()[0], cfg.compute_dtype)
  # XLA's cost analysis of an SPMD program counts one device's share.
  utilisation = flops / step_s / (peak * 1e12) if peak and flops else None
  return {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "mesh": dict(mesh.shape), "compile_s": compile_s, "step_s": step_s,
          "images_per_s": images / step_s, "flops_per_device": flops,
          "peak_tflops_per_device": peak, "utilisation": utilisation,
          "loss": float(metrics["loss"])}


def main(argv):
  del argv
  result = benchmark(_CONFIG.value, _STEPS.value, _PEAK.value)
  util = result["utilisation"]
  print(f"devices           {result['devices']}, mesh {result['mesh']}")
  print(f"compile time      {result['compile_s']:.1f} s")
  print(f"step time         {result['step_s'] * 1e3:.1f} ms")
  print(f"images/s          {result['images_per_s']:.1f}")
  print(f"FLOPs per device  {result['flops_per_device'] / 1e9:.2f} GFLOP per step")
  print("utilisation       " + (f"{100 * util:.1f}% of {result['peak_tflops_per_device']}"
                                 " TFLOP/s" if util is not None else
                                 "n/a (unknown peak: pass --peak_tflops)"))


if __name__ == "__main__":
  app.run(main)
