"""Unit tests of the VQ-VAE tokenizer and its reference weight mapping.

The reference semantics are transcribed into float64 numpy below (torch's Conv2d and
ConvTranspose2d definitions, the EMA update), independently of the Flax code.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.vqvae import vqvae_entries, vqvae_from_reference_kwargs
from ait_jax.models.vqvae import VQVAE, EMAVectorQuantizer

jax.config.update("jax_default_matmul_precision", "highest")

# 16x16 maps, 2x2 tokens: ds 8, three stride-2 convs, encoder widths 2-4-8.
TINY = dict(mask_size=16, token_length=4, embedding_dim=6, hidden_dim=8,
            num_embeddings=8, num_resnet_blocks=1)


def _init(module, batch=2, seed=0):
  x = jnp.zeros((batch, module.mask_size, module.mask_size))
  return nn.unbox(module.init(jax.random.key(seed), x))


def _maps(module, batch=2, seed=1):
  return np.random.default_rng(seed).uniform(
      0, 1, (batch, module.mask_size, module.mask_size)).astype(np.float32)


# --- numpy transcription of the reference (NCHW, torch layouts, float64) -------------

def _np_conv(x, w, b, stride, pad):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for dy in range(kh):
    for dx in range(kw):
      patch = x[:, :, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride]
      out += np.einsum("bchw,oc->bohw", patch, w[:, :, dy, dx])
  return out + b[None, :, None, None]


def _np_conv_transpose(x, w, b, stride=2, pad=1):
  """torch: out[o, y*s - p + ky, x*s - p + kx] += in[i, y, x] * w[i, o, ky, kx]."""
  _, _, h, wd = x.shape
  kh, kw = w.shape[2:]
  full = np.zeros((x.shape[0], w.shape[1], (h - 1) * stride + kh, (wd - 1) * stride + kw))
  for ky in range(kh):
    for kx in range(kw):
      full[:, :, ky:ky + stride * h:stride, kx:kx + stride * wd:stride] += np.einsum(
          "bihw,io->bohw", x, w[:, :, ky, kx])
  out = full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]
  return out + b[None, :, None, None]


def _relu(x):
  return np.maximum(x, 0)


def _np_layer(sd, key, x, stride=1, pad=0):
  return _np_conv(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride, pad)


def _np_res(sd, key, x):
  y = _relu(_np_layer(sd, f"{key}.net.0", x, pad=1))
  y = _relu(_np_layer(sd, f"{key}.net.2", y, pad=1))
  return x + _np_layer(sd, f"{key}.net.4", y)


def _np_encoder(sd, x, n_down, n_res):
  idx = 0
  for _ in range(n_down):
    x = _relu(_np_layer(sd, f"encoder.{idx}", x, 2, 1))
    idx += 2
  for _ in range(n_res):
    x = _np_res(sd, f"encoder.{idx}", x)
    idx += 1
  return _np_layer(sd, f"encoder.{idx}", x)


def _np_decoder(sd, z, n_up, n_res):
  x = _relu(_np_layer(sd, "decoder.0", z))
  idx = 2
  for _ in range(n_res):
    x = _np_res(sd, f"decoder.{idx}", x)
    idx += 1
  for _ in range(n_up):
    x = _relu(_np_conv_transpose(x, sd[f"decoder.{idx}.weight"], sd[f"decoder.{idx}.bias"]))
    idx += 2
  return _np_layer(sd, f"decoder.{idx}", x)[:, 0]


# --- mapping ----------------------------------------------------------------------

def test_mapping_round_trip_is_exact_and_covers_the_model():
  module = VQVAE(**TINY)
  variables = _init(module)
  entries = vqvae_entries(module)
  mapping.check_covers(entries, variables, collections=("params", "vq"))
  sd = mapping.to_torch(variables, entries)
  assert list(sd) == [e.torch_key for e in entries]
  assert sd["encoder.0.weight"].shape == (2, 1, 4, 4)
  assert sd["decoder.5.weight"].shape == (8, 4, 4, 4)  # ConvTranspose: (in, out, kh, kw)
  back = mapping.to_flax(sd, entries)
  flat, flat_back = mapping.flatten(variables), mapping.flatten(back)
  assert flat.keys() == flat_back.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(flat_back[path], np.asarray(value), err_msg=str(path))


def test_wrong_state_dict_lists_every_problem():
  module = VQVAE(**TINY)
  entries = vqvae_entries(module)
  sd = mapping.to_torch(_init(module), entries)
  del sd["encoder.0.bias"]
  sd["codebook.weight"] = np.zeros((8, 6), np.float32)
  sd["decoder.0.weight"] = np.zeros((9, 6, 1, 1), np.float32)
  with pytest.raises(mapping.StateDictMismatch) as err:
    mapping.to_flax(sd, entries)
  message = str(err.value)
  for key in ("encoder.0.bias", "codebook.weight", "decoder.0.weight"):
    assert key in message


# --- reference constructors --------------------------------------------------------

def test_stage1_depth_config_builds_the_depth_tokenizer():
  # vae/configs/depth/ait_depth_vqvae.py `model` and the AiT depth `vae_cfg`.
  train = vqvae_from_reference_kwargs(dict(
      image_size=480, num_resnet_blocks=2, downsample_ratio=32, num_tokens=128,
      codebook_dim=512, hidden_dim=16, use_norm=False, channels=1,
      train_objective="regression", max_value=10., residul_type="v1",
      loss_type="mse_ignore_zero"), "train")
  ait = vqvae_from_reference_kwargs(dict(
      type="VQVAE", use_norm=False, token_length=225, mask_size=480, embedding_dim=512,
      hidden_dim=256, num_resnet_blocks=2, num_embeddings=128, tau=0.8,
      pretrained="vqvae_depth.pt", freeze=True), "ait")
  assert ait.tau == 0.8
  assert (train.token_length, train.hidden_dim, train.encoder_width) == (225, 256, 16)
  assert (train.loss_type, train.max_value) == ("mse_ignore_zero", 10.0)
  assert vqvae_entries(train) == vqvae_entries(ait)


def test_unsupported_reference_options_are_all_named():
  with pytest.raises(ValueError, match="use_sigmoid.*bogus|bogus.*use_sigmoid"):
    vqvae_from_reference_kwargs(dict(use_sigmoid=True, bogus=1), "ait")
  with pytest.raises(ValueError) as err:
    vqvae_from_reference_kwargs(
        dict(residul_type="v2", loss_type="l1", ema_decay=0.0, channels=3), "train")
  for word in ("residul_type", "loss_type", "ema_decay", "channels"):
    assert word in str(err.value)
  with pytest.raises(ValueError, match="not a square"):
    vqvae_from_reference_kwargs(dict(token_length=15), "ait")
  with pytest.raises(ValueError, match="kind"):
    vqvae_from_reference_kwargs({}, "dalle")


# --- numerics ----------------------------------------------------------------------

def test_encode_and_decode_follow_torch_semantics():
  """Conv, ConvTranspose(4, 2, 1) layout and padding, argmin, row-major tokens."""
  module = VQVAE(**TINY, use_norm=True, max_value=2.0)
  variables = _init(module)
  sd = {k: v.astype(np.float64) for k, v in
        mapping.to_torch(variables, vqvae_entries(module)).items()}
  x = _maps(module) * 2.0
  n_down, n_res = module.num_downsamples, module.num_resnet_blocks

  z = _np_encoder(sd, (2 * (x / 2.0 - 0.5))[:, None], n_down, n_res)  # (B, D, 2, 2)
  flat = z.transpose(0, 2, 3, 1).reshape(-1, module.embedding_dim)
  codebook = sd["_vq_vae._embedding"]
  want_tokens = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), 1).reshape(2, 4)
  tokens = module.apply(variables, x, method=VQVAE.encode)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, want_tokens)

  codes = codebook[want_tokens].reshape(2, 2, 2, -1).transpose(0, 3, 1, 2)
  want = (_np_decoder(sd, codes, n_down, n_res) * 0.5 + 0.5) * 2.0
  got = module.apply(variables, want_tokens, method=VQVAE.decode)
  assert got.shape == (2, 16, 16)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_forward_losses_and_ignore_zero_target():
  module = VQVAE(**TINY, use_norm=False, loss_type="mse_ignore_zero")
  variables = _init(module)
  label = _maps(module) - 0.3  # about 30% of the target is <= 0: ignored
  x = label * (np.arange(16) % 2 == 0)  # a masked input
  out = module.apply(variables, x, label)
  got = np.asarray(out.out, np.float64)
  valid = label > 0
  np.testing.assert_allclose(out.recon_loss, np.mean((label - got)[valid] ** 2), rtol=1e-5)
  np.testing.assert_allclose(out.total_loss, out.recon_loss + out.vq_loss, rtol=1e-6)
  np.testing.assert_array_equal(out.tokens, module.apply(variables, x, method=VQVAE.encode))

  z = module.apply(variables, x, method=lambda m, v: m._features(m._normalize(v, "x")))
  codes = np.asarray(variables["vq"]["quantizer"]["embedding"])[np.asarray(out.tokens)]
  vq_loss = 0.25 * np.mean((codes.reshape(z.shape) - np.asarray(z, np.float64)) ** 2)
  np.testing.assert_allclose(out.vq_loss, vq_loss, rtol=1e-5)

  normed = VQVAE(**TINY, use_norm=True, max_value=2.0)
  out = normed.apply(variables, x, label)  # same weights; 'mse' against norm(label)
  got_normed = 2.0 * (np.asarray(out.out, np.float64) / 2.0 - 0.5)
  np.testing.assert_allclose(
      out.recon_loss, np.mean((got_normed - 2.0 * (label / 2.0 - 0.5)) ** 2), rtol=1e-5)


def test_ema_update_closed_form():
  codebook = np.array([[0., 0.], [1., 0.], [0., 1.]])
  cluster = np.array([1.0, 2.0, 0.5])
  ema_w = np.array([[0.5, 0.5], [2.0, 0.2], [0.1, 0.4]])
  z = np.array([[[[0.1, 0.0], [0.9, 0.1]], [[1.1, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
  vq = EMAVectorQuantizer(num_embeddings=3, embedding_dim=2)
  variables = {"vq": {"embedding": codebook, "ema_cluster_size": cluster, "ema_w": ema_w}}
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)

  (codes, ids, loss), updated = vq.apply(variables, jnp.asarray(z, jnp.float32),
                                         train=True, mutable=["vq"])
  np.testing.assert_array_equal(ids, [[[0, 1], [1, 2]]])
  old = codebook[[0, 1, 1, 2]].reshape(z.shape)  # quantised with the old codebook
  np.testing.assert_allclose(codes, old, atol=1e-7)
  np.testing.assert_allclose(loss, 0.25 * np.mean((old - z) ** 2), rtol=1e-6)

  counts = np.array([1., 2., 1.])
  size = 0.99 * cluster + 0.01 * counts
  n = size.sum()
  size = (size + 1e-5) / (n + 3 * 1e-5) * n
  dw = np.array([[0.1, 0.0], [2.0, 0.1], [0.0, 2.0]])
  w = 0.99 * ema_w + 0.01 * dw
  new = updated["vq"]
  np.testing.assert_allclose(new["ema_cluster_size"], size, rtol=1e-6)
  np.testing.assert_allclose(new["ema_w"], w, rtol=1e-6)
  np.testing.assert_allclose(new["embedding"], w / size[:, None], rtol=1e-6)

  _, same = vq.apply(variables, jnp.asarray(z, jnp.float32), train=False, mutable=["vq"])
  jax.tree.map(np.testing.assert_array_equal, same, variables)


def test_init_with_train_does_not_update_the_codebook():
  module = VQVAE(**TINY)
  x = jnp.asarray(_maps(module))
  a = module.init(jax.random.key(3), x, train=True)
  b = module.init(jax.random.key(3), x)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(a["vq"]), nn.unbox(b["vq"]))
  assert not np.any(nn.unbox(a["vq"])["quantizer"]["ema_cluster_size"])


def test_decode_soft_of_peaked_logits_is_decode_of_argmax():
  module = VQVAE(**TINY)
  variables = _init(module)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, 8, (3, 4))
  logits = 1e3 * np.eye(8, dtype=np.float32)[tokens] + rng.normal(size=(3, 4, 8))
  hard = module.apply(variables, tokens, method=VQVAE.decode)
  soft = module.apply(variables, logits, method=VQVAE.decode_soft)
  np.testing.assert_allclose(soft, hard, atol=1e-6)
  # tau scales the logits; the module's tau is the default.
  logits = rng.normal(size=(3, 4, 8)).astype(np.float32)
  a = module.apply(variables, logits, 0.5, method=VQVAE.decode_soft)
  b = VQVAE(**TINY, tau=0.5).apply(variables, logits, method=VQVAE.decode_soft)
  c = module.apply(variables, 0.5 * logits, method=VQVAE.decode_soft)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(a, c, atol=1e-6)


def test_encode_is_row_major_and_ties_go_to_the_first_code():
  module = VQVAE(**TINY)
  variables = _init(module)
  x = _maps(module, batch=1)
  z = module.apply(variables, x, method=lambda m, v: m._features(m._normalize(v, "x")))
  rows = np.asarray(z).reshape(4, module.embedding_dim)  # grid cells, row-major
  # Codes 0-3 are the cells' own features and codes 4-7 exact copies of them.
  variables["vq"]["quantizer"]["embedding"] = jnp.asarray(np.concatenate([rows, rows]))
  tokens = module.apply(variables, x, method=VQVAE.encode)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3]])
  decoded = module.apply(variables, tokens, method=VQVAE.decode)
  again = module.apply(variables, tokens + 4, method=VQVAE.decode)
  np.testing.assert_array_equal(decoded, again)
  with pytest.raises(ValueError, match="16, 16"):
    module.apply(variables, x[:, :8], method=VQVAE.encode)


def test_codebook_is_not_trainable_and_gradients_pass_straight_through():
  module = VQVAE(**TINY)
  variables = _init(module)
  assert set(variables) == {"params", "vq"}
  assert set(variables["vq"]["quantizer"]) == {"embedding", "ema_cluster_size", "ema_w"}
  assert "quantizer" not in variables["params"]
  x = jnp.asarray(_maps(module))
  # Positive biases keep every ReLU of the tiny random net alive.
  variables["params"] = mapping.unflatten({
      path: jnp.full_like(v, 0.5) if path[-1] == "bias" else v
      for path, v in mapping.flatten(variables["params"]).items()})

  @jax.jit
  def grads(params):
    def loss(params, name):
      return getattr(module.apply({**variables, "params": params}, x), name)
    return (jax.grad(loss)(params, "recon_loss"), jax.grad(loss)(params, "vq_loss"))

  recon, commit = grads(variables["params"])
  # The reconstruction reaches the encoder only through the straight-through codes.
  for grads in (recon["encoder"], recon["decoder"], commit["encoder"]):
    assert all(np.any(g) for g in jax.tree.leaves(grads))
  assert not any(np.any(g) for g in jax.tree.leaves(commit["decoder"]))

  _, updated = module.apply(variables, x, train=True, mutable=["vq"])
  assert not np.array_equal(updated["vq"]["quantizer"]["embedding"],
                            variables["vq"]["quantizer"]["embedding"])
