"""Convert weights between ait-jax workdirs (orbax) and the reference's PyTorch files.

  python -m ait_jax.convert to-torch --config configs/X.py --workdir DIR [--step N]
      --out FILE [--vqvae TASK] [--allow_partial]
  python -m ait_jax.convert from-torch --config configs/X.py --workdir DIR
      --in FILE [--in [ROLE=]FILE ...] [--step N] [--allow_partial]

to-torch writes the config's weights as the reference's state_dict (its key names,
layouts and buffers): FILE.safetensors always, and a `torch.save` file (FILE.pth, or
FILE itself when it ends in .pth/.pt/.bin) when torch is installed. A stage-2 (AiT)
workdir gives the full reference AiT state_dict, tokenizers included (taken from where
the config says, or DIR/tokenizer_<task>); `--vqvae TASK`, or a stage-1 workdir, gives
one tokenizer in the reference VQ-VAE layout.

from-torch reads reference files (a full AiT checkpoint, a SimMIM or other SwinV2
backbone, VQ-VAE files; see ait_jax/checkpoint/pretrained.py for each role, which is
detected from the keys or named as ROLE=FILE) and writes DIR as a workdir at step N
(default 0): DIR/checkpoints (the trainer's orbax checkpoint, fresh optimizer state),
DIR/config.json, one DIR/tokenizer_<task>.safetensors per tokenizer read, and
DIR/conversion_report.json with every key that was not loaded. Without --allow_partial,
every parameter must come from exactly one fitting key; with it, the others keep their
initialisation from config.seed and are listed.

PyTorch pickles are only read as weights (ait_jax/checkpoint/torch_files.py); torch is
optional. The converter runs in one process.
"""

import json
import os
import sys
from collections.abc import Mapping

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.manager import Checkpointer
from ait_jax.checkpoint.vqvae import vqvae_from_reference_kwargs
from ait_jax.parallel import mesh as mesh_lib
from ait_jax.train import config_base
from ait_jax.train import experiment as experiment_lib
from ait_jax.train import trainer

COMMANDS = ("to-torch", "from-torch")
REPORT_FILE = "conversion_report.json"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The ait-jax workdir.")
_STEP = flags.DEFINE_integer("step", None, "to-torch: the step to export (default: the "
                             "latest); from-torch: the step to write (default 0).")
_OUT = flags.DEFINE_string("out", None, "to-torch: the output file (see above).")
_VQVAE = flags.DEFINE_string("vqvae", None, "to-torch: write this task's tokenizer alone.")
_IN = flags.DEFINE_multi_string("in", None, "from-torch: [ROLE=]FILE, repeatable.")
_ALLOW_PARTIAL = flags.DEFINE_boolean("allow_partial", False,
                                      "Allow weights that do not cover the model; the "
                                      "keys not loaded are listed.")


# --- the model of a config ----------------------------------------------------------

def _conversion_config(cfg) -> ml_collections.ConfigDict:
  """The config on this process's devices (a checkpoint restores onto any mesh)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return cfg


def target_of(cfg) -> pretrained.Target:
  if cfg.stage == "ait":
    return pretrained.ait_target(ait_from_reference_config(cfg.model.to_dict()))
  return pretrained.tokenizer_target(
      vqvae_from_reference_kwargs(cfg.model.to_dict(), "train"), cfg.task)


class Workdir:
  """The trainer's state of a config in a workdir: its shapes, shardings, checkpoints."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = _conversion_config(cfg), workdir
    self.mesh = mesh_lib.mesh_from_config(self.cfg.mesh)
    self.exp = experiment_lib.make_experiment(self.cfg, workdir, self.mesh)
    self.factory = trainer.StateFactory(self.exp, self.cfg, self.mesh)

  def checkpointer(self) -> Checkpointer:
    return Checkpointer(os.path.join(self.workdir, trainer.CHECKPOINT_DIR),
                        async_save=False)

  def restore(self, step: int | None):
    """(state, step) of `step` or the latest checkpoint."""
    ckpt = self.checkpointer()
    try:
      steps = ckpt.all_steps()
      if not steps:
        raise FileNotFoundError(f"{self.workdir}/{trainer.CHECKPOINT_DIR} holds no "
                                "complete checkpoint")
      step = max(steps) if step is None else step
      if step not in steps:
        raise FileNotFoundError(f"{self.workdir} has no checkpoint of step {step} "
                                f"(it has {sorted(steps)})")
      state, _ = ckpt.restore(step, self.factory.abstract_with_shardings(),
                              with_data=False)
    finally:
      ckpt.close()
    return state, step

  def initial_variables(self) -> tuple[dict, dict]:
    """(params, extra) of a fresh model, from config.seed."""
    init = jax.jit(lambda key: nn.meta.unbox(self.exp.init_variables(key)))
    return jax.device_get(init(jax.random.key(self.cfg.seed)))

  def save(self, step: int, params: dict, extra: dict) -> None:
    """The trainer's checkpoint of `params` at `step`, with a fresh optimizer state."""
    shardings = self.factory.shardings
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(self.factory.tx.init, out_shardings=shardings.opt_state)(params)
    state = experiment_lib.TrainState(
        step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), params=params,
        opt_state=opt_state, extra=jax.device_put(extra, shardings.extra))
    ckpt = self.checkpointer()
    try:
      # No data position: the input pipeline starts from its beginning.
      ckpt.save(step, state, {})
      ckpt.wait_until_finished()
    finally:
      ckpt.close()


def _tokenizer_source(cfg, workdir: str, task: str) -> str | None:
  """Where a stage-2 run's tokenizer of `task` is: the config's, or one in `workdir`."""
  if task in cfg.tokenizers and cfg.tokenizers[task].checkpoint:
    return cfg.tokenizers[task].checkpoint
  for candidate in (tokenizer_file(workdir, task), os.path.join(workdir, f"tokenizer_{task}")):
    if os.path.exists(candidate):
      return candidate
  return None


def tokenizer_file(workdir: str, task: str) -> str:
  """Where from-torch writes the tokenizer of `task` it read."""
  return os.path.abspath(os.path.join(workdir, f"tokenizer_{task}.safetensors"))


# --- to-torch -----------------------------------------------------------------------

def workdir_state_dict(cfg, workdir: str, *, step: int | None = None,
                       vqvae: str | None = None, allow_partial: bool = False,
                       model_only: bool = False) -> tuple[dict, int, list[str]]:
  """(reference state_dict, step, keys left out) of the workdir's weights.

  `vqvae` keeps one tokenizer only; `model_only` leaves the tokenizers out.
  """
  wd = Workdir(cfg, workdir)
  target = target_of(cfg)
  state, step = wd.restore(step)
  params, extra = jax.device_get(state.params), jax.device_get(state.extra)
  if cfg.stage == "tokenizer":
    if vqvae not in (None, cfg.task):
      raise ValueError(f"--vqvae {vqvae}: {workdir} trains the {cfg.task} tokenizer")
    variables, entries = {"params": params, **extra}, target.entries
  else:
    if vqvae is not None and vqvae not in target.tokenizer_roles:
      raise ValueError(f"--vqvae {vqvae}: the config's tokenizers are "
                       f"{target.tokenizer_roles}")
    variables = {"model": {"params": params}, "tokenizers": {}}
    for task, tokenizer in target.tokenizers.items():
      source = None if model_only else _tokenizer_source(cfg, workdir, task)
      if vqvae in (None, task) and source is not None:
        variables["tokenizers"][task] = experiment_lib.load_tokenizer(source, tokenizer,
                                                                      wd.mesh)
    entries = target.entries if vqvae is None else target.parts[vqvae]
    if model_only:
      entries = [e for e in entries if ".vqvae." not in e.torch_key]
  entries, left_out = _available(entries, variables, allow_partial, workdir)
  return mapping.to_torch(variables, entries), step, left_out


def to_torch(cfg, workdir: str, out: str, *, step: int | None = None,
             vqvae: str | None = None, allow_partial: bool = False) -> list[str]:
  """Writes the workdir's weights as a reference state_dict; returns the files."""
  sd, step, left_out = workdir_state_dict(cfg, workdir, step=step, vqvae=vqvae,
                                          allow_partial=allow_partial)
  written = torch_files.write_state_dict(out, sd, metadata={
      "ait_jax_workdir": os.path.abspath(workdir), "ait_jax_step": str(step)})
  print(f"wrote {len(sd)} tensors of step {step} to {', '.join(written)}")
  if left_out:
    print(f"left out ({len(left_out)}, not in the workdir): {', '.join(left_out)}")
  return written


def workdir_file(workdir: str) -> torch_files.StateDictFile:
  """The latest AiT weights (no tokenizers) of an ait-jax stage-2 workdir, as a
  reference state_dict (`config.init.model` may name a workdir)."""
  cfg = trainer.read_config(workdir)
  if cfg.stage != "ait":
    raise ValueError(f"{workdir} trains a tokenizer, not AiT")
  sd, step, _ = workdir_state_dict(cfg, workdir, model_only=True)
  return torch_files.StateDictFile(workdir, sd, [f"step {step} of the ait-jax workdir"])


def _available(entries, variables, allow_partial: bool, workdir: str):
  """The entries whose leaves exist; the rest is an error unless partial is allowed."""
  flat = mapping.flatten(variables)
  absent = [e.torch_key for e in entries
            if isinstance(e, mapping.Param) and e.flax_path not in flat]
  if absent and not allow_partial:
    raise mapping.StateDictMismatch(
        f"{workdir} (set --config.tokenizers.<task>.checkpoint for a tokenizer kept "
        "elsewhere, or pass --allow_partial to write without these keys)", missing=absent)
  keep = [e for e in entries if not (isinstance(e, mapping.Param)
                                     and e.flax_path not in flat)]
  return keep, absent


# --- from-torch ---------------------------------------------------------------------

def parse_input(spec: str, roles) -> tuple[str | None, str]:
  """'ROLE=FILE' or 'FILE' -> (role or None, file)."""
  role, sep, path = spec.partition("=")
  if sep and role in roles:
    return role, path
  return None, spec


def read_inputs(specs, target: pretrained.Target) -> list[pretrained.PartImport]:
  parts = []
  for spec in specs:
    role, path = parse_input(spec, target.parts)
    file = torch_files.read_state_dict(path)
    role = role or pretrained.detect_role(file, target)
    parts.append(pretrained.import_part(file, role, target))
  return parts


def from_torch(cfg, inputs, workdir: str, *, step: int = 0,
               allow_partial: bool = False) -> pretrained.Combined:
  """Writes `workdir` from reference files; returns what was loaded from where."""
  if not inputs:
    raise ValueError("from-torch needs at least one --in FILE")
  ckpt_dir = os.path.join(workdir, trainer.CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} is not empty: convert into a new workdir")
  target = target_of(cfg)
  combined = pretrained.combine(read_inputs(inputs, target), target)
  pretrained.check(combined, allow_partial=allow_partial,
                   what=f"the model of this {cfg.stage} config")

  wd = Workdir(cfg, workdir)
  params, extra = _state_variables(wd, combined.loaded, target.leaf_keys(),
                                   ("model",) if cfg.stage == "ait" else ())
  wd.save(step, params, extra)

  cfg = ml_collections.ConfigDict(cfg.to_dict())
  tokenizer_files = _write_tokenizers(cfg, combined, target, workdir)
  trainer.write_config(cfg, workdir)
  with open(os.path.join(workdir, REPORT_FILE), "w") as f:
    json.dump({**combined.report(), "step": step,
               "tokenizer_files": tokenizer_files}, f, indent=1)
  _print_summary(combined, workdir, tokenizer_files)
  return combined


def _state_variables(wd: Workdir, loaded: dict, known: Mapping,
                     root: tuple) -> tuple[dict, dict]:
  """(params, extra) of the train state: the loaded leaves under `root`, the others
  from a fresh initialisation (computed only when some leaf is not loaded)."""
  abstract = {"params": wd.factory.abstract.params, **wd.factory.abstract.extra}
  wanted = mapping.flatten(abstract)
  unmapped = ["/".join(p) for p in wanted if root + p not in known]
  if unmapped:
    raise AssertionError(f"the weight mapping does not name {', '.join(unmapped)}")
  fresh = {}
  if any(root + p not in loaded for p in wanted):
    params, extra = wd.initial_variables()
    fresh = mapping.flatten({"params": params, **extra})
  values = {}
  for path, want in wanted.items():
    value = loaded.get(root + path)
    if value is None:
      value = fresh[path]
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(f"{'/'.join(root + path)}: shape {value.shape}, the model has "
                       f"{want.shape}")
    values[path] = np.asarray(value, want.dtype)
  tree = mapping.unflatten(values)
  return tree.pop("params"), tree


def _write_tokenizers(cfg, combined, target, workdir: str) -> dict[str, str]:
  """Tokenizers read from the inputs, as reference-layout files the trainer reads."""
  written = {}
  for task in target.tokenizer_roles if cfg.stage == "ait" else []:
    entries = target.parts[task]
    leaves = {e.flax_path for e in entries if isinstance(e, mapping.Param)}
    if not leaves <= combined.loaded.keys():
      continue
    variables = mapping.unflatten({p: combined.loaded[p] for p in leaves})
    path = tokenizer_file(workdir, task)
    torch_files.write_safetensors(path, mapping.to_torch(variables, entries))
    with cfg.unlocked():
      if task not in cfg.tokenizers:
        cfg.tokenizers[task] = config_base.tokenizer_source("", train=False)
      cfg.tokenizers[task].checkpoint = path
    written[task] = path
  return written


def _print_summary(combined, workdir: str, tokenizer_files: dict) -> None:
  for part in combined.parts:
    print(f"{part.source} as {part.role}: loaded {len(part.loaded)} arrays")
    for note in part.notes:
      print(f"  {note}")
    by_reason: dict[str, list[str]] = {}
    for key, why in part.ignored:
      by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
      print(f"  ignored ({why}, {len(keys)}): {', '.join(keys)}")
    for problem in part.problems():
      print(f"  not loaded: {problem}")
  if combined.not_loaded:
    print(f"initialised from config.seed, not loaded ({len(combined.not_loaded)}): "
          + ", ".join(combined.not_loaded))
  flags_ = "".join(f" --config.tokenizers.{t}.checkpoint={p}"
                   for t, p in tokenizer_files.items())
  print(f"wrote {workdir} (report: {os.path.join(workdir, REPORT_FILE)}). Train or "
        f"evaluate with: python -m ait_jax.main --config CONFIG --workdir {workdir}"
        f"{flags_} [--mode eval]")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m ait_jax.convert {{{'|'.join(COMMANDS)}}} "
                         "--config configs/X.py --workdir DIR ...")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  try:
    if argv[1] == "to-torch":
      if not _OUT.value:
        raise app.UsageError("to-torch needs --out FILE")
      to_torch(_CONFIG.value, _WORKDIR.value, _OUT.value, step=_STEP.value,
               vqvae=_VQVAE.value, allow_partial=_ALLOW_PARTIAL.value)
    else:
      from_torch(_CONFIG.value, _IN.value or [], _WORKDIR.value,
                 step=_STEP.value or 0, allow_partial=_ALLOW_PARTIAL.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
