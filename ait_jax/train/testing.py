"""Helpers for the trainer's tests: a tiny workspace and subprocess runs.

Multi-device and multi-process tests run the trainer in subprocesses (the simulated
device count is fixed when JAX starts). They share one small synthetic dataset, one
random tokenizer (a reference-format .npz, so no stage-1 run is needed) and JAX's
persistent compilation cache, which keeps repeated compilations of the same tiny
programs cheap.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.vqvae import vqvae_entries
from ait_jax.train import data as train_data
from ait_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny_depth.py")


def make_workspace(root: str) -> dict:
  """Synthetic data and a random tokenizer for configs/tiny_depth.py under `root`."""
  cfg = trainer.load_config_file(TINY_CONFIG)
  data = os.path.join(root, "data")
  train_data.write_synthetic(data, cfg.data.synthetic, "nyu")
  tok = ait_from_reference_config(cfg.model.to_dict()).tokenizers["depth"]
  variables = tok.init(jax.random.key(7), jnp.zeros((1, tok.mask_size, tok.mask_size)))
  variables = {k: variables[k] for k in ("params", "vq")}
  state_dict = mapping.to_torch(nn.meta.unbox(variables), vqvae_entries(tok))
  tokenizer = os.path.join(root, "tokenizer_depth.npz")
  np.savez(tokenizer, **state_dict)
  return {"data": data, "tokenizer": tokenizer, "cache": os.path.join(root, "jax_cache")}


def tiny_flags(workspace: dict, **overrides) -> list[str]:
  """--config flags of a tiny run on the workspace (overrides: dotted key -> value)."""
  values = {"data.synthetic_dir": workspace["data"],
            "tokenizers.depth.checkpoint": workspace["tokenizer"],
            "progress_bar": False, "eval_at_end": False, **overrides}
  return [f"--config={TINY_CONFIG}"] + [f"--config.{k}={v}" for k, v in values.items()]


def subprocess_env(workspace: dict, devices: int = 1, **extra) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update({
      # Tiny programs: LLVM's optimisations cost more compile time than they save.
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0",
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": workspace["cache"],
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
      **{k: str(v) for k, v in extra.items()}})
  return env


def run_main(workdir: str, flags: list[str], env: dict, timeout: int = 240,
             check: bool = True) -> subprocess.CompletedProcess:
  """`python -m ait_jax.main` in a subprocess; raises with its output if it fails."""
  cmd = [sys.executable, "-m", "ait_jax.main", f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-6000:]}")
  return proc


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
