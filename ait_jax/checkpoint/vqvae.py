"""The VQ-VAE tokenizer's reference constructors and state_dict mapping.

Both reference classes (AiT's frozen `ait/code/model/vqvae.py:VQVAE` and the stage-1
`vae/models/VQVAE.py:VQVAE`) store the same keys: the encoder and decoder as
`nn.Sequential` indices (ReLUs take indices but hold no weights), then the EMA codebook
buffers `_vq_vae._embedding`, `_vq_vae._ema_cluster_size`, `_vq_vae._ema_w`, which map
to the 'vq' collection.
"""

from ait_jax.checkpoint.mapping import Entry, param
from ait_jax.models.vqvae import LOSS_TYPES, VQVAE

# Constructor defaults of each reference class; `None` marks keywords that do not
# change the computation here (weights file, freezing, unused training options).
_AIT_DEFAULTS = dict(type="VQVAE", token_length=16, mask_size=64, embedding_dim=512,
                     num_embeddings=1024, pretrained=None, freeze=None,
                     num_resnet_blocks=2, hidden_dim=256, use_norm=True,
                     use_sigmoid=False, tau=1.0)
_TRAIN_DEFAULTS = dict(image_size=256, num_tokens=512, codebook_dim=512,
                       num_resnet_blocks=2, hidden_dim=16, channels=1, loss_type="mse",
                       temperature=None, straight_through=None, kl_div_loss_weight=None,
                       simplify=None, max_value=1.0, downsample_ratio=16, use_norm=True,
                       alpha=None, train_objective="regression", num_classes=None,
                       residul_type="v1", ema_decay=0.99, commitment_cost=0.25)
# Options whose other values select code paths this port does not have.
_AIT_REQUIRED = dict(type="VQVAE", use_sigmoid=False)
_TRAIN_REQUIRED = dict(channels=1, train_objective="regression", residul_type="v1")


def vqvae_from_reference_kwargs(kwargs: dict, kind: str) -> VQVAE:
  """The module for a reference constructor's keywords (class defaults applied).

  kind 'ait': `ait/code/model/vqvae.py` keywords (an AiT config's `vae_cfg`, whose
  registry `type` must be 'VQVAE'; `pretrained` and `freeze` are accepted and ignored);
  kind 'train': `vae/models/VQVAE.py` keywords (the stage-1 `model` configs), whose
  `hidden_dim` is the encoder's first width and becomes `hidden_dim * (ds // 2)`.
  Raises ValueError listing every unknown or unsupported keyword.
  """
  if kind not in ("ait", "train"):
    raise ValueError(f"VQ-VAE kind must be 'ait' or 'train', got {kind!r}")
  defaults, required = ((_AIT_DEFAULTS, _AIT_REQUIRED) if kind == "ait"
                        else (_TRAIN_DEFAULTS, _TRAIN_REQUIRED))
  problems = [f"unknown keyword {k!r}" for k in kwargs if k not in defaults]
  kw = {**defaults, **kwargs}
  problems += [f"{k}={kw[k]!r} is not supported (only {v!r})"
               for k, v in required.items() if kw[k] != v]
  if kind == "train":
    if kw["loss_type"] not in LOSS_TYPES:
      problems.append(f"loss_type={kw['loss_type']!r} is not supported (only {LOSS_TYPES})")
    if not kw["ema_decay"] > 0:
      problems.append(f"ema_decay={kw['ema_decay']!r}: only the EMA codebook "
                      "(ema_decay > 0) is supported")
    ds = kw["downsample_ratio"]
    if ds < 2 or kw["image_size"] % ds:
      problems.append(f"image_size {kw['image_size']} is not a multiple of "
                      f"downsample_ratio {ds} >= 2")
  if problems:
    raise ValueError(f"VQ-VAE ({kind!r} keywords): " + "; ".join(problems))
  if kind == "ait":
    module = VQVAE(mask_size=kw["mask_size"], token_length=kw["token_length"],
                   embedding_dim=kw["embedding_dim"], hidden_dim=kw["hidden_dim"],
                   num_embeddings=kw["num_embeddings"],
                   num_resnet_blocks=kw["num_resnet_blocks"], use_norm=kw["use_norm"],
                   tau=kw["tau"])
  else:
    ds = kw["downsample_ratio"]
    module = VQVAE(mask_size=kw["image_size"], token_length=(kw["image_size"] // ds) ** 2,
                   embedding_dim=kw["codebook_dim"],
                   hidden_dim=kw["hidden_dim"] * (ds // 2), num_embeddings=kw["num_tokens"],
                   num_resnet_blocks=kw["num_resnet_blocks"], use_norm=kw["use_norm"],
                   max_value=kw["max_value"], commitment_cost=kw["commitment_cost"],
                   decay=kw["ema_decay"], loss_type=kw["loss_type"])
  _ = module.decoder_width  # raises now if the derived sizes do not fit
  return module


def _conv_entries(torch_prefix: str, flax_path: tuple[str, ...], kernel: int,
                  cin: int, cout: int, layout: str = "conv") -> list[Entry]:
  return [param(f"{torch_prefix}.weight", ("params", *flax_path, "kernel"),
                (kernel, kernel, cin, cout), layout),
          param(f"{torch_prefix}.bias", ("params", *flax_path, "bias"), (cout,))]


def _res_entries(torch_prefix: str, flax_path: tuple[str, ...], width: int) -> list[Entry]:
  out = []
  for i, kernel in enumerate((3, 3, 1)):
    out += _conv_entries(f"{torch_prefix}.net.{2 * i}", (*flax_path, f"conv_{i}"),
                         kernel, width, width)
  return out


def vqvae_entries(module: VQVAE) -> list[Entry]:
  """Mapping entries of `module`, in the reference state_dict order."""
  n_down, n_res = module.num_downsamples, module.num_resnet_blocks
  out: list[Entry] = []
  width, index = 1, 0
  for i in range(n_down):  # conv, ReLU pairs
    new = module.encoder_width * 2 ** i
    out += _conv_entries(f"encoder.{index}", ("encoder", f"down_{i}"), 4, width, new)
    width, index = new, index + 2
  for i in range(n_res):
    out += _res_entries(f"encoder.{index}", ("encoder", f"res_{i}"), width)
    index += 1
  out += _conv_entries(f"encoder.{index}", ("encoder", "to_codes"), 1, width,
                       module.embedding_dim)

  width = module.decoder_width
  out += _conv_entries("decoder.0", ("decoder", "from_codes"), 1, module.embedding_dim,
                       width)
  index = 2
  for i in range(n_res):
    out += _res_entries(f"decoder.{index}", ("decoder", f"res_{i}"), width)
    index += 1
  for i in range(n_down):  # ConvTranspose, ReLU pairs
    new = width if i == 0 else width // 2
    out += _conv_entries(f"decoder.{index}", ("decoder", f"up_{i}"), 4, width, new,
                         "conv_transpose")
    width, index = new, index + 2
  out += _conv_entries(f"decoder.{index}", ("decoder", "to_pixels"), 1, width, 1)

  k, d = module.num_embeddings, module.embedding_dim
  out += [param("_vq_vae._embedding", ("vq", "quantizer", "embedding"), (k, d)),
          param("_vq_vae._ema_cluster_size", ("vq", "quantizer", "ema_cluster_size"), (k,)),
          param("_vq_vae._ema_w", ("vq", "quantizer", "ema_w"), (k, d))]
  return out
