"""The two-tower model: outputs, parameter tree, variants' sizes, FLOPs, config errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit.data import batch as batch_lib
from lit_navit.models import flops
from lit_navit.models import two_towers
from lit_navit.models import variants
from model_batches import pack, random_image

P = 4
EMBED = 8


def tiny_config(**overrides):
  config = two_towers.default_config()
  config.image.variant = f'mu/{P}'
  config.image.max_grid = 4
  config.text.variant = 'mu'
  config.text.vocab_size = 16
  config.text.max_len = 6
  config.embed_dim = EMBED
  config.update(overrides)
  return config


def sample_batch():
  rng = np.random.default_rng(0)
  images = [[random_image(rng, 2, 3, P), random_image(rng, 1, 2, P)],
            [random_image(rng, 3, 3, P)]]
  return pack(images, tokens_per_row=10, slots=3,
              captions=[[[3, 4, 2], [5, 2]], [[6, 7, 8, 2]]], text_len=6,
              captions_per_group=4)


@functools.lru_cache(maxsize=None)
def model_and_params(**overrides):
  model = two_towers.TwoTowers(tiny_config(**overrides))
  params = jax.jit(model.init)(jax.random.key(0), sample_batch())
  return model, params


def test_outputs_and_methods():
  model, params = model_and_params()
  batch = sample_batch()

  @jax.jit
  def run(params, batch):
    return (model.apply(params, batch, train=True),
            model.apply(params, batch, method=model.embed_images),
            model.apply(params, batch['text/tokens'], method=model.embed_texts))

  (z_img, z_txt, extras), slot_img, alone_txt = run(params, batch)
  # Four caption rows: the three images' captions in slot order, one empty.
  valid = np.asarray(batch['text/valid']).reshape(-1)
  assert valid.tolist() == [True, True, True, False]
  assert z_img.shape == z_txt.shape == (4, EMBED)
  assert slot_img.shape == (6, EMBED)
  np.testing.assert_array_equal(extras['valid'], valid)
  for z in (z_img, z_txt):
    np.testing.assert_allclose(np.linalg.norm(z[:3], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(extras['t'], 10.0, rtol=1e-6)
  np.testing.assert_allclose(extras['b'], -10.0)
  # Caption row c pairs the image of slot text/slot[c]: (0, 0), (0, 1), (1, 0).
  np.testing.assert_allclose(z_img[:3], np.asarray(slot_img)[[0, 1, 3]], atol=1e-6)
  np.testing.assert_allclose(alone_txt, z_txt, atol=1e-6)
  assert not np.allclose(z_txt[0], z_txt[1])


def test_param_tree_follows_the_loss():
  _, params = model_and_params()
  assert set(params['params']) == {'img', 'txt', 't', 'b'}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  softmax = two_towers.param_shapes(tiny_config(loss='softmax'))
  assert set(softmax['params']) == {'img', 'txt', 't'}
  assert two_towers.DEFAULT_T_INIT['softmax'] == pytest.approx(math.log(1 / 0.07))


def test_gradients_are_finite_with_empty_slots():
  model, params = model_and_params()

  def loss(params):
    z_img, z_txt, extras = model.apply(params, sample_batch())
    logits = z_img @ z_txt.T * extras['t'] + extras['b']
    return jnp.sum(jax.nn.log_sigmoid(logits) * extras['valid'])

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(grads['params']['img']['embedding']['kernel'] != 0)


def test_bfloat16_compute_keeps_float32_params():
  float32_model, params = model_and_params()
  bfloat16_model = two_towers.TwoTowers(tiny_config(dtype='bfloat16'))
  # The same float32 tree serves both: the compute dtype is not a parameter's.
  assert jax.tree.structure(two_towers.param_shapes(bfloat16_model.config)) == \
      jax.tree.structure(params)
  z_img, z_txt, _ = jax.jit(bfloat16_model.apply)(params, sample_batch())
  expected_img, expected_txt, _ = jax.jit(float32_model.apply)(params, sample_batch())
  assert z_img.dtype == jnp.float32 and not np.array_equal(z_img, expected_img)
  np.testing.assert_allclose(z_img, expected_img, atol=0.05)
  np.testing.assert_allclose(z_txt, expected_txt, atol=0.05)


def test_l2_normalize_is_safe_at_zero():
  np.testing.assert_array_equal(two_towers.l2_normalize(jnp.zeros((2, 3))), 0)
  grad = jax.grad(lambda x: two_towers.l2_normalize(x).sum())(jnp.zeros(3))
  assert np.all(np.isfinite(grad))


# Parameter counts, written out independently of the model code.
def _encoder_count(width, depth, mlp_dim):
  attention = 4 * width * width + 4 * width
  mlp = 2 * width * mlp_dim + mlp_dim + width
  return depth * (attention + mlp + 4 * width) + 2 * width  # + LayerNorms.


def _map_count(width, mlp_dim):
  return width + 4 * width * width + 4 * width + 2 * width + 2 * width * mlp_dim + mlp_dim + width


def _tower_count(config, tower):
  shapes = two_towers.param_shapes(config)['params'][tower]
  return two_towers.param_count(shapes)


@pytest.mark.parametrize('size', sorted(variants.SIZES))
def test_variant_param_counts(size):
  config = two_towers.default_config()
  config.image.variant = f'{size}/16'
  config.text.variant = size
  width, depth, mlp_dim, _ = variants.SIZES[size]
  embed = config.embed_dim
  image = (16 * 16 * 3 * width + width                      # patch embedding
           + 2 * config.image.max_grid * width               # learned factorized posemb
           + _encoder_count(width, depth, mlp_dim)
           + _map_count(width, mlp_dim) + width * embed + embed)
  text = (config.text.vocab_size * width + config.text.max_len * width
          + _encoder_count(width, depth, mlp_dim) + width * embed + embed)
  assert _tower_count(config, 'img') == image
  assert _tower_count(config, 'txt') == text


def test_b16_is_vit_base_sized():
  config = two_towers.default_config()
  # The bare ViT-B/16 (mean pool, no head) is the standard ~86M (85.8M).
  config.image.pool = 'mean'
  config.embed_dim = 1  # A head of 769 parameters.
  assert _tower_count(config, 'img') == pytest.approx(85.8e6, rel=0.005)
  # SigLIP's B/16 towers: ~93M image (MAP head), ~110M text.
  default = two_towers.default_config()
  assert _tower_count(default, 'img') == pytest.approx(93e6, rel=0.01)
  assert _tower_count(default, 'txt') == pytest.approx(110e6, rel=0.01)


def test_forward_flops_match_xla_cost_analysis():
  # Unrolled layers: XLA's cost analysis counts a scan body only once.
  config = tiny_config()
  config.image.scan = config.text.scan = False
  spec = batch_lib.BatchSpec(rows=2, tokens_per_row=10, slots=3, text_len=6, patch_size=P)
  model = two_towers.TwoTowers(config)
  compiled = jax.jit(model.apply).lower(two_towers.param_shapes(config, spec),
                                        two_towers.dummy_batch(spec)).compile()
  cost = compiled.cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)['flops']
  # The analytic count leaves out element-wise work: a little under XLA's.
  assert 0.85 * xla_flops < flops.forward_flops(config, spec) <= xla_flops


def test_training_flops():
  config = two_towers.default_config()
  spec = batch_lib.BatchSpec(rows=4, tokens_per_row=256, slots=4, text_len=64, patch_size=16)
  img = flops.image_forward_flops(config, spec)
  txt = flops.text_forward_flops(config, spec)
  assert flops.forward_flops(config, spec) == img + txt
  assert flops.training_flops(config, spec) == 3 * (img + txt)
  assert flops.training_flops(config, spec, frozen=['img']) == img + 3 * txt
  # ViT-B/16 at 256 tokens is ~2 x 86M x 256 plus attention: ~47 GFLOPs per row.
  assert img / spec.rows == pytest.approx(47e9, rel=0.05)
  with pytest.raises(ValueError, match='unknown towers'):
    flops.training_flops(config, spec, frozen=['image'])


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match='unknown loss'):
    two_towers.param_shapes(tiny_config(loss='hinge'))
  config = tiny_config()
  config.image.variant = 'mu'
  with pytest.raises(ValueError, match='base_patch_size'):
    two_towers.param_shapes(config)
  config.image.base_patch_size = 8
  assert two_towers.param_shapes(config)['params']['img']['embedding']['kernel'].shape[0] == 8
  with pytest.raises(AttributeError, match='no_such_key'):
    _ = tiny_config().image.no_such_key
