"""Reference weight files into this project's variables, part by part, with a report.

A config converts to one variables tree (its `Target`):
  stage 2 (AiT):   {'model': {'params': ...}, 'tokenizers': {task: {'params', 'vq'}}}
  stage 1 (VQ-VAE): {'params': ..., 'vq': ...}
Each input file fills one part of it, its role:
* 'ait': a full reference AiT checkpoint (what mmcv's `load_from` reads);
* 'backbone': a SwinV2 backbone, as the reference's `init_cfg=Pretrained` reads it: a
  SimMIM file (`encoder.` keys in a 'model' entry), a bare backbone, or the `backbone.`
  keys of an AiT file. Like the reference's `init_weights`, the derived tables
  (`relative_coords_table`, `relative_position_index`) are dropped and recomputed for
  this config's windows: the position-bias MLP is what transfers to other window sizes
  (a note warns when the file's tables show offsets scaled for another
  `pretrain_window_size` than the config's);
* a task name ('depth', 'insseg'): a VQ-VAE tokenizer, as `vae_cfg.pretrained` is read
  (the stray `codebook.weight` the reference's loader drops is dropped here too).

Every key of a file ends up in its `PartImport`: loaded, missing, unexpected, of the
wrong shape, of a disagreeing value, or ignored for a stated reason. `combine` puts the
parts together and `check` raises one `IncompleteImport` that lists every problem of
every file, unless a partial load is allowed explicitly.
"""

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.ait import ReferenceAiT, ait_entries
from ait_jax.checkpoint.swin_v2 import swin_v2_entries
from ait_jax.checkpoint.torch_files import StateDictFile
from ait_jax.checkpoint.vqvae import vqvae_entries
from ait_jax.models.swin_v2 import SwinV2
from ait_jax.models.vqvae import VQVAE

AIT, BACKBONE = "ait", "backbone"
BACKBONE_PREFIXES = ("backbone.", "encoder.")
DERIVED_TABLES = ("relative_coords_table", "relative_position_index")
STRAY_VQVAE_KEYS = ("codebook.weight",)

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """The entries of one config's variables tree, as a whole and per input role."""
  entries: list[mapping.Entry]
  parts: dict[str, list[mapping.Entry]]
  backbone: SwinV2 | None = None
  tokenizers: dict[str, VQVAE] = dataclasses.field(default_factory=dict)  # by task

  @property
  def tokenizer_roles(self) -> list[str]:
    return [r for r in self.parts if r not in (AIT, BACKBONE)]

  def leaf_keys(self) -> dict[Path, str]:
    """Every Flax leaf, named by its first reference key."""
    out: dict[Path, str] = {}
    for e in self.entries:
      if isinstance(e, mapping.Param):
        out.setdefault(e.flax_path, e.torch_key)
    return out


def ait_target(ref: ReferenceAiT) -> Target:
  parts = {AIT: ait_entries(ref),
           BACKBONE: mapping.prefixed(swin_v2_entries(ref.model.backbone), "",
                                      ("backbone",), ("model",))}
  for task, tok in ref.tokenizers.items():
    parts[task] = mapping.prefixed(vqvae_entries(tok), "", flax_root=("tokenizers", task))
  return Target(parts[AIT], parts, ref.model.backbone, dict(ref.tokenizers))


def tokenizer_target(module: VQVAE, task: str) -> Target:
  entries = vqvae_entries(module)
  return Target(entries, {task: entries}, tokenizers={task: module})


@dataclasses.dataclass
class PartImport:
  """What one file gave to one part of the target, and every key it did not give."""
  source: str
  role: str
  loaded: dict[Path, np.ndarray]
  notes: list[str] = dataclasses.field(default_factory=list)
  ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, why)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  shape: list[tuple] = dataclasses.field(default_factory=list)   # (key, got, want)
  value: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def complete(self) -> bool:
    return not (self.missing or self.unexpected or self.shape or self.value)

  def problems(self) -> list[str]:
    out = []
    if self.missing:
      out.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      out.append(f"unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    out += [f"shape mismatch: {k} has {tuple(got)}, the model needs {tuple(want)}"
            for k, got, want in self.shape]
    out += [f"value mismatch: {k}: {why}" for k, why in self.value]
    return out

  def summary(self) -> dict:
    return dict(source=self.source, role=self.role, loaded=len(self.loaded),
                notes=self.notes, ignored=[f"{k}: {why}" for k, why in self.ignored],
                missing=self.missing, unexpected=self.unexpected,
                shape=[f"{k}: file {tuple(g)}, model {tuple(w)}" for k, g, w in self.shape],
                value=[f"{k}: {why}" for k, why in self.value])


def detect_role(file: StateDictFile, target: Target) -> str:
  """The part a file fills, from its keys; ambiguous files must be named (ROLE=FILE)."""
  keys = list(file.state_dict)
  tokenizers = target.tokenizer_roles
  if set(target.parts) == set(tokenizers) and len(tokenizers) == 1:
    return tokenizers[0]
  if "_vq_vae._embedding" in keys:
    fits = [t for t in tokenizers if import_part(file, t, target).complete]
    if len(tokenizers) == 1 or len(fits) == 1:
      return (fits or tokenizers)[0]
    raise ValueError(f"{file.path}: a VQ-VAE file, but it fits {fits or 'none'} of this "
                     f"config's tokenizers {tokenizers}; name it: --in TASK={file.path}")
  if AIT in target.parts and any(k.startswith("transformer.") or re.match(r"\w+_head\.", k)
                                 for k in keys):
    return AIT
  if BACKBONE in target.parts and any(k.endswith("patch_embed.proj.weight") for k in keys):
    return BACKBONE
  raise ValueError(f"{file.path}: cannot tell which part of the model it holds (first "
                   f"keys: {', '.join(keys[:5])}); name it: --in ROLE={file.path} with ROLE "
                   f"one of {sorted(target.parts)}")


def import_part(file: StateDictFile, role: str, target: Target) -> PartImport:
  """The Flax leaves `file` gives to part `role`, and an account of every key."""
  if role not in target.parts:
    raise ValueError(f"{file.path}: role {role!r} is not a part of this config's model "
                     f"(parts: {sorted(target.parts)})")
  result = PartImport(file.path, role, {}, notes=list(file.notes))
  sd = dict(file.state_dict)
  if role == BACKBONE:
    sd = _backbone_keys(sd, target.backbone, result)
  elif role != AIT:
    sd = _tokenizer_keys(sd, role, result)
  entries = target.parts[role]
  try:
    loaded = mapping.to_flax(sd, entries, source=file.path)
  except mapping.StateDictMismatch as err:
    result.missing, result.unexpected = err.missing, err.unexpected
    result.shape, result.value = err.shape, err.value
    if err.value:
      return result  # nothing is loaded from a file that contradicts the config
    bad = set(err.unexpected) | {k for k, _, _ in err.shape}
    loaded = mapping.to_flax({k: v for k, v in sd.items() if k not in bad}, entries,
                             source=file.path, allow_missing=True)
  result.loaded = _as_float32(mapping.flatten(loaded), result)
  return result


def _as_float32(flat: dict[Path, np.ndarray], result: PartImport) -> dict[Path, np.ndarray]:
  """Parameters are float32 here; files saved in half precision are widened."""
  cast = sorted({str(v.dtype) for v in flat.values() if v.dtype != np.float32})
  if cast:
    result.notes.append(f"converted {', '.join(cast)} arrays to float32")
  return {p: np.asarray(v, np.float32) for p, v in flat.items()}


def _backbone_keys(sd: dict, backbone: SwinV2, result: PartImport) -> dict:
  """The backbone's keys as the reference's `init_weights` selects them."""
  picked = {}
  for k, v in sd.items():
    for prefix in BACKBONE_PREFIXES:
      if k.startswith(prefix):
        picked[k[len(prefix):]] = v
  if picked:
    used = [p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in sd)]
    result.notes.append(f"took the keys under {' and '.join(map(repr, used))}")
    result.ignored += [(k, "outside the backbone") for k in sd
                       if not k.startswith(BACKBONE_PREFIXES)]
  else:
    picked = dict(sd)
  derived = [k for k in picked if any(t in k for t in DERIVED_TABLES)]
  _check_coordinate_normalisation(picked, backbone, result)
  result.ignored += [(k, "derived table, recomputed for this config's window sizes")
                     for k in derived]
  return {k: v for k, v in picked.items() if k not in derived}


def _check_coordinate_normalisation(sd: Mapping, backbone: SwinV2, result: PartImport):
  """Warns when the file's position MLP was trained on other coordinate scales.

  The MLP transfers to any window size only if this config's `pretrain_window_size`
  scales the offsets as in pretraining; the file's own table tells that scale.
  """
  for i, pretrain in enumerate(backbone.pretrain_window_sizes):
    table = sd.get(f"layers.{i}.blocks.0.attn.relative_coords_table")
    if table is None or np.ndim(table) != 4 or table.shape[1] < 3:
      continue
    window = (table.shape[1] + 1) // 2
    largest = float(np.asarray(table)[0, -1, -1, 0])  # offset +(window - 1), log-scaled
    if largest == 0.0:
      continue
    file_pretrain = 1 + math.copysign(8 * (window - 1) / (2 ** (3 * abs(largest)) - 1),
                                      largest)
    if abs(file_pretrain - pretrain) > 1e-3 * abs(pretrain - 1):
      result.notes.append(
          f"WARNING: stage {i}: the file's coordinate table (window {window}) scales "
          f"offsets for a pretrain window of {file_pretrain:.4g}, but this config has "
          f"pretrain_window_size[{i}]={pretrain}: the position-bias MLP will see offsets "
          "on another scale than in pretraining")


def _tokenizer_keys(sd: dict, task: str, result: PartImport) -> dict:
  prefix = f"{task}_head.vqvae."
  if any(k.startswith(prefix) for k in sd):
    result.notes.append(f"took the keys under {prefix!r}")
    result.ignored += [(k, f"outside the {task} tokenizer") for k in sd
                       if not k.startswith(prefix)]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  for key in STRAY_VQVAE_KEYS:
    if key in sd:
      result.ignored.append((key, "not a VQ-VAE weight; the reference's loader drops it"))
      sd = {k: v for k, v in sd.items() if k != key}
  return sd


class IncompleteImport(ValueError):
  """The input files do not give exactly the config's weights; lists every problem."""


@dataclasses.dataclass
class Combined:
  loaded: dict[Path, np.ndarray]
  parts: list[PartImport]
  not_loaded: list[str]          # reference keys of the leaves no file gave
  conflicts: list[str]

  def report(self) -> dict:
    return dict(files=[p.summary() for p in self.parts], not_loaded=self.not_loaded,
                conflicts=self.conflicts)


def combine(parts: Sequence[PartImport], target: Target) -> Combined:
  loaded: dict[Path, np.ndarray] = {}
  given_by: dict[Path, str] = {}
  conflicts = []
  names = target.leaf_keys()
  for part in parts:
    for path, value in part.loaded.items():
      if path in given_by:
        conflicts.append(f"{names.get(path, '/'.join(path))} is given by both "
                         f"{given_by[path]} and {part.source}")
        continue
      loaded[path], given_by[path] = value, part.source
  not_loaded = [key for path, key in names.items() if path not in loaded]
  return Combined(loaded, list(parts), not_loaded, conflicts)


def check(combined: Combined, *, allow_partial: bool, what: str) -> None:
  """Raises `IncompleteImport` unless every leaf came from exactly one fitting key
  (with `allow_partial`: unless a value disagrees or a leaf is given twice)."""
  fatal = bool(combined.conflicts) or any(p.value for p in combined.parts)
  partial = bool(combined.not_loaded) or any(not p.complete for p in combined.parts)
  if not fatal and (allow_partial or not partial):
    return
  lines = [f"the input files do not give the weights of {what}:"]
  for part in combined.parts:
    problems = part.problems()
    if problems:
      lines.append(f"{part.source} (as {part.role}):")
      lines += [f"  {p}" for p in problems]
  if combined.not_loaded:
    lines.append(f"parameters not loaded ({len(combined.not_loaded)}): "
                 + ", ".join(combined.not_loaded))
  lines += [f"conflict: {c}" for c in combined.conflicts]
  if fatal:
    lines.append("Disagreeing values and conflicts are errors even with --allow_partial: "
                 "check that the config matches the files.")
  else:
    lines.append("Pass --allow_partial to load what fits: the rest keeps its initial "
                 "values, and every key not loaded is listed in the report.")
  raise IncompleteImport("\n".join(lines))
