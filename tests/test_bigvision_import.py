"""big_vision checkpoints in and out, against fixtures made by big_vision itself.

The bar: the imported model gives big_vision's zimg and ztxt to 1e-5 (float32,
CPU), and its logits, t and b, for a SigLIP ViT and a SigLIP 2 NaFlex fixture,
whatever block layout either side uses.
"""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from lit_navit.interop import big_vision
from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit.interop import big_vision_export
from lit_navit.interop import workdir as workdir_lib
from lit_navit.data import text as text_lib
from lit_navit.models import pooling
from lit_navit.models import posemb
from lit_navit.models import two_towers
from lit_navit.models import variants
import bv_fixtures

TOL = 1e-5
LAYOUTS = {'stored': None, 'scan': True, 'per_layer': False}


def _embed(config, params, name, packed=False):
  """(zimg, ztxt, logits, t, b) of the model on the fixture's inputs."""
  model = two_towers.TwoTowers(config)
  batch = bv_fixtures.image_batch(name, config.image.base_patch_size)
  if packed:
    batch = bv_fixtures.pack_into_one_row(batch)
  variables = {'params': params}
  zimg = np.asarray(model.apply(variables, batch, method=model.embed_images))
  tokens = bv_fixtures.load(name, 'inputs')['text']
  ztxt = np.asarray(model.apply(variables, tokens, method=model.embed_texts))
  t = float(np.exp(params['t'][0]))
  b = float(params['b'][0]) if 'b' in params else 0.0
  return zimg, ztxt, zimg @ ztxt.T * t + b, t, b


def _assert_matches_big_vision(outputs, name):
  zimg, ztxt, logits, t, b = outputs
  expected = bv_fixtures.load(name, 'expected')
  assert np.abs(zimg - expected['zimg']).max() <= TOL
  assert np.abs(ztxt - expected['ztxt']).max() <= TOL
  # Logits are t (about 10) times a dot product: 1e-5 relative.
  np.testing.assert_allclose(logits, expected['logits'], atol=TOL * t)
  np.testing.assert_allclose(t, expected['out/t'][0], rtol=1e-6)
  np.testing.assert_allclose(b, expected['out/b'][0], rtol=1e-6)


def _import(name, scan=None):
  arrays = big_vision.load_npz(bv_fixtures.path(name, 'params'))
  config = big_vision.model_config(arrays, big_vision.Options(scan=scan))
  return arrays, config, big_vision.to_params(arrays, config)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('name', bv_fixtures.NAMES)
def test_imported_model_reproduces_big_vision(name, layout):
  _, config, params = _import(name, LAYOUTS[layout])
  assert config.image.scan == config.text.scan == (LAYOUTS[layout] or False)
  _assert_matches_big_vision(_embed(config, params, name), name)


@pytest.mark.parametrize('name', bv_fixtures.NAMES)
def test_encode_takes_big_vision_inputs_as_they_are(name):
  _, config, params = _import(name)
  inputs = bv_fixtures.load(name, 'inputs')
  image = inputs['image'] if 'image' in inputs else tuple(
      inputs[k] for k in ('patches', 'ptype', 'yabs', 'xabs'))
  zimg, ztxt, out = big_vision.encode(config, params, image, inputs['text'])
  logits = zimg @ ztxt.T * out['t'][0] + out['b'][0]
  _assert_matches_big_vision((zimg, ztxt, logits, out['t'][0], out['b'][0]), name)


@pytest.mark.parametrize('name', bv_fixtures.NAMES)
def test_imported_tower_reproduces_big_vision_with_images_packed_in_one_row(name):
  _, config, params = _import(name)
  _assert_matches_big_vision(_embed(config, params, name, packed=True), name)


def test_sizes_are_read_from_the_checkpoint():
  arrays, config, _ = _import('siglip2_naflex')
  assert (config.image.stem, config.image.posemb, config.image.max_grid) == (
      'dense', 'learn_2d_resized', 8)
  assert not config.image.head and config.text.head
  assert config.text.max_len == 16 and config.text.vocab_size == 1000
  # A checkpoint of other sizes: a stacked (scanned) layout, 3 blocks, width
  # 48, 6 heads, MLP 96, patch 8, a 5x5 grid, no MAP head, 24 tokens.
  rng = np.random.default_rng(0)
  shapes = {
      'img/embedding/kernel': (8, 8, 3, 48), 'img/embedding/bias': (48,),
      'img/pos_embedding': (1, 25, 48), 'img/head/kernel': (48, 32),
      'img/head/bias': (32,),
      'txt/Embed_0/embedding': (300, 40), 'txt/pos_embedding': (1, 24, 40),
      'txt/head/kernel': (40, 32), 'txt/head/bias': (32,), 't': (1,),
  }
  for tower, width, mlp, heads in (('img/Transformer', 48, 96, 6),
                                   ('txt/Encoder_0', 40, 80, 5)):
    head_dim = width // heads
    block = {'LayerNorm_0/scale': (width,), 'LayerNorm_0/bias': (width,),
             'LayerNorm_1/scale': (width,), 'LayerNorm_1/bias': (width,),
             'MlpBlock_0/Dense_0/kernel': (width, mlp), 'MlpBlock_0/Dense_0/bias': (mlp,),
             'MlpBlock_0/Dense_1/kernel': (mlp, width), 'MlpBlock_0/Dense_1/bias': (width,)}
    for proj in ('query', 'key', 'value'):
      block[f'MultiHeadDotProductAttention_0/{proj}/kernel'] = (width, heads, head_dim)
      block[f'MultiHeadDotProductAttention_0/{proj}/bias'] = (heads, head_dim)
    block['MultiHeadDotProductAttention_0/out/kernel'] = (heads, head_dim, width)
    block['MultiHeadDotProductAttention_0/out/bias'] = (width,)
    shapes.update({f'{tower}/encoderblock/{k}': (3, *v) for k, v in block.items()})
    shapes[f'{tower}/encoder_norm/scale'] = shapes[f'{tower}/encoder_norm/bias'] = (width,)
  other = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  config = big_vision.model_config(other, big_vision.Options(text_pool='first'))
  assert config.image.scan and config.text.scan
  assert (config.image.width, config.image.depth, config.image.num_heads,
          config.image.mlp_dim, config.image.base_patch_size) == (48, 3, 6, 96, 8)
  assert (config.image.posemb, config.image.max_grid, config.image.pool) == (
      'learn_1d_resized', 5, 'mean')
  assert (config.text.width, config.text.num_heads, config.text.max_len,
          config.text.pool, config.embed_dim, config.loss) == (40, 5, 24, 'first', 32,
                                                               'softmax')
  params = big_vision.to_params(other, config)
  np.testing.assert_array_equal(
      params['img']['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel'],
      other['img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'])
  # Header-only reading sees the same model.
  path = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'bv_other_{os.getpid()}.npz')
  try:
    big_vision.save_npz(path, other)
    assert big_vision.model_config(big_vision.load_shapes(path),
                                   big_vision.Options(text_pool='first')) == config
  finally:
    os.remove(path)


@pytest.mark.parametrize('name', bv_fixtures.NAMES)
def test_export_writes_back_the_same_arrays_and_reimports(name, tmp_path):
  arrays, config, params = _import(name, scan=True)
  for scan in (None, False):  # None: the model's layout, stacked here.
    path = str(tmp_path / f'{name}_{scan}.npz')
    big_vision.save_npz(path, big_vision.from_params(params, config, scan=scan))
    exported = big_vision.load_npz(path)
    if scan is False:  # The fixtures are per-layer: the very same file contents.
      assert sorted(exported) == sorted(arrays)
      for key, value in arrays.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    else:  # Another file: it must import to a model that still matches.
      again = big_vision.model_config(exported)
      assert again.image.scan and again.text.scan
      _assert_matches_big_vision(_embed(again, big_vision.to_params(exported, again),
                                        name), name)


def _corrupt(tmp_path, name, change):
  arrays = big_vision.load_npz(bv_fixtures.path(name, 'params'))
  change(arrays)
  path = str(tmp_path / 'bad.npz')
  big_vision.save_npz(path, arrays)
  return path


def test_bad_checkpoints_fail_naming_the_parameter_and_both_shapes(tmp_path):
  _, config, _ = _import('siglip_vit')
  key = 'img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'

  def load(change):
    return big_vision.load_npz(_corrupt(tmp_path, 'siglip_vit', change))

  wrong = load(lambda a: a.update({key: a[key][:, :100]}))
  with pytest.raises(big_vision.CheckpointMismatch,
                     match=r"'img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'"
                     r': checkpoint has \(64, 100\), model expects \(64, 128\)'):
    big_vision.to_params(wrong, config)
  missing = load(lambda a: a.pop('txt/head/bias'))
  with pytest.raises(big_vision.CheckpointMismatch,
                     match=r"missing 'txt/head/bias' \(model expects \(64,\)\)"):
    big_vision.to_params(missing, config)
  extra = load(lambda a: a.update({'img/Transformer/encoderblock_2/LayerNorm_0/scale':
                                   np.ones(64, np.float32)}))
  with pytest.raises(big_vision.CheckpointMismatch,
                     match=r"unexpected 'img/Transformer/encoderblock_2/LayerNorm_0/scale'"):
    big_vision.to_params(extra, config)
  layout = load(lambda a: a.update({'img/embedding/kernel': np.ones((5, 7), np.float32)}))
  with pytest.raises(big_vision.CheckpointMismatch,
                     match=r"'img/embedding/kernel' has shape \(5, 7\), expected"):
    big_vision.model_config(layout)
  cls = load(lambda a: a.update({'img/cls': np.ones((1, 1, 64), np.float32)}))
  with pytest.raises(big_vision.CheckpointMismatch, match="'img/cls'"):
    big_vision.model_config(cls)


@pytest.mark.parametrize('prefix', ['params/', 'opt/target/'])
def test_released_prefixed_names_are_read_as_the_plain_ones(prefix, tmp_path):
  plain = big_vision.load_npz(bv_fixtures.path('siglip2_naflex', 'params'))
  npz = bv_fixtures.prefixed_copy('siglip2_naflex', prefix, tmp_path)
  loaded = big_vision.load_npz(npz)
  assert sorted(loaded) == sorted(plain)
  for key in plain:
    np.testing.assert_array_equal(loaded[key], plain[key], err_msg=key)
  shapes = big_vision.load_shapes(npz)
  assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in plain.items()}
  # LiT's config reads the headers (the trainer's init reads load_npz).
  config = _lit_config(npz)
  assert config.model.image == big_vision.model_config(plain).image


def test_pickled_arrays_are_refused(tmp_path):
  path = str(tmp_path / 'pickled.npz')
  np.savez(path, t=np.array([object()], dtype=object))
  with pytest.raises(big_vision.CheckpointMismatch, match='pickle'):
    big_vision.load_npz(path)
  with pytest.raises(big_vision.CheckpointMismatch, match='pickle'):
    big_vision.load_shapes(path)
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(big_vision.CheckpointMismatch):
    big_vision.load_shapes(str(tmp_path / 'junk.npz'))
  assert zipfile.is_zipfile(path)


def test_models_big_vision_lacks_are_not_exported():
  _, config, params = _import('siglip_vit')
  config.image.qk_norm = True
  config.text.causal = True
  with pytest.raises(ValueError, match='image.qk_norm, text.causal'):
    big_vision.from_params(params, config)


def test_siglip2_objectives_params_are_not_exported():
  """A model trained with the decoder, self-distillation and masked
  prediction exports exactly its two towers' arrays."""
  import jax  # pylint: disable=import-outside-toplevel
  import test_distill  # pylint: disable=import-outside-toplevel
  config = test_distill.tiny_config()
  config.image.posemb = 'learn_2d_resized'
  config.decoder.weight = 1.0
  for key, value in dict(width=8, depth=1, mlp_dim=16, num_heads=2).items():
    config.decoder[key] = value
  towers = config.copy_and_resolve_references()
  towers.decoder.weight = towers.distill.weight = towers.distill.masked_weight = 0.0
  init = lambda c: jax.jit(two_towers.TwoTowers(c).init)(
      jax.random.key(0), test_distill.sample_batch())['params']
  params = init(config)
  assert {'dec', 'distill_head', 'patch_head'} <= set(params)
  assert 'mask_token' in params['img']
  exported = big_vision.from_params(params, config)
  expected = big_vision.from_params(two_towers.without_training_only(params), towers)
  assert set(exported) == set(big_vision.from_params(init(towers), towers))
  for name, array in expected.items():
    np.testing.assert_array_equal(exported[name], array)


def test_tokenizer_follows_the_recipe():
  path = text_lib.default_tokenizer_path()
  _, vit, _ = _import('siglip_vit')
  _, naflex, _ = _import('siglip2_naflex')
  assert workdir_lib.guess_recipe(vit) == 'siglip'
  assert workdir_lib.guess_recipe(naflex) == 'siglip2'
  for model_config, pad in ((vit, 1), (naflex, 0)):
    config = workdir_lib.training_config(
        model_config, path, workdir_lib.guess_recipe(model_config), 64)
    tokenizer = text_lib.Tokenizer.from_config(config.input)
    long_caption = 'A RED CIRCLE ' * 10
    short, long = tokenizer.encode(['A red circle', long_caption])
    assert tokenizer.pad_id == pad and len(short) == 16
    # Lowercased, EOS appended, padded with the recipe's id; a cut caption
    # still ends in EOS (sticky).
    plain = text_lib.Tokenizer(path, 16).encode(['a red circle'])[0]
    n = int((plain != 0).sum())
    np.testing.assert_array_equal(short[:n], plain[:n])
    assert short[n - 1] == tokenizer.eos_id and (short[n:] == pad).all()
    assert long[-1] == tokenizer.eos_id


def _cli(module, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, '-m', module, *args], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc


@pytest.mark.slow
def test_cli_import_then_export_round_trips_through_orbax(tmp_path):
  workdir = str(tmp_path / 'imported')
  _cli('lit_navit.interop.big_vision_import', '--npz', bv_fixtures.path('siglip2_naflex', 'params'),
       '--tokenizer', text_lib.default_tokenizer_path(), '--workdir', workdir,
       '--scan', 'true')
  config, params = checkpoint.load_for_inference(workdir)
  assert config.model.image.scan and config.input.pad_id == 0
  assert config.input.tokenizer == os.path.join(workdir, 'tokenizer.model')
  _assert_matches_big_vision(_embed(config.model, params, 'siglip2_naflex'),
                             'siglip2_naflex')
  npz = str(tmp_path / 'out' / 'exported.npz')
  _cli('lit_navit.interop.big_vision_export', '--checkpoint', workdir, '--npz', npz,
       '--scan', 'false')
  original = big_vision.load_npz(bv_fixtures.path('siglip2_naflex', 'params'))
  with np.load(npz, allow_pickle=False) as exported:  # numpy alone
    assert sorted(exported.files) == sorted(original)
    for key in original:
      np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
  with open(str(tmp_path / 'out' / 'exported.json'), encoding='utf-8') as f:
    model_cfg = json.load(f)
  fixture_cfg = json.load(open(os.path.join(bv_fixtures.ROOT, 'siglip2_naflex',
                                            'config.json'), encoding='utf-8'))['model_cfg']
  assert model_cfg['image_model'] == fixture_cfg['image_model']
  assert model_cfg['out_dim'] == fixture_cfg['out_dim']
  for tower in ('image', 'text'):
    for key, value in model_cfg[tower].items():
      assert fixture_cfg[tower].get(key, value) == value, (tower, key)



def test_sincos2d_is_big_vision_channel_order():
  # big_vision's posemb_sincos_2d written out for a 3x5 grid, width 16:
  # channels [sin x, cos x, sin y, cos y], frequencies 1e4 ** -(i / 3).
  width, rows, cols = 16, 3, 5
  y, x = np.mgrid[:rows, :cols]
  omega = 1.0 / 10_000.0 ** (np.arange(4) / 3)
  y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  expected = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  yx = np.stack(np.divmod(np.arange(rows * cols), cols), -1).astype(np.int32)
  module = posemb.make('sincos2d', width, max_grid=8)
  got = module.apply({}, yx, np.full_like(yx, (rows, cols)))
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_flat_posemb_is_the_same_grid_resized():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(4, 4, 8)).astype(np.float32)
  grid = np.array([[3, 6]] * 18, np.int32)
  yx = np.stack(np.divmod(np.arange(18), 6), -1).astype(np.int32)
  as_grid = posemb.make('learn_2d_resized', 8, 4).apply(
      {'params': {'pos_embedding': table}}, yx, grid)
  as_flat = posemb.make('learn_1d_resized', 8, 4).apply(
      {'params': {'pos_embedding': table.reshape(1, 16, 8)}}, yx, grid)
  np.testing.assert_array_equal(as_grid, as_flat)


def test_named_and_explicit_sizes():
  assert variants.decode('So400m/14') == dict(width=1152, depth=27, mlp_dim=4304,
                                              num_heads=16, patch_size=14)
  assert variants.decode('g-opt/16')['width'] == 1536
  c = two_towers.default_config().image
  c.variant, c.width, c.num_heads = 'B/16', 512, 8
  assert variants.tower_size(c) == dict(width=512, depth=12, mlp_dim=3072, num_heads=8)
  c.variant = ''
  with pytest.raises(ValueError, match='image.depth'):
    variants.tower_size(c, 'image')


def test_masked_max_pools_each_slot_over_its_own_tokens():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 3)).astype(np.float32)
  segment = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2]])
  slot_mask = segment[:, None, :] == np.arange(1, 3)[None, :, None]
  got = np.asarray(pooling.masked_max(x, slot_mask))
  for b in range(2):
    for e in range(2):
      np.testing.assert_array_equal(got[b, e], x[b][segment[b] == e + 1].max(0))


def test_a_rectangular_vit_posemb_is_read_as_its_grid():
  # A ViT trained on 2x3-patch images adds pos_embedding[0, i] to token i
  # (row-major); on a 2x3 image the resized grid must give exactly that.
  arrays = big_vision.load_npz(bv_fixtures.path('siglip_vit', 'params'))
  rng = np.random.default_rng(0)
  arrays['img/pos_embedding'] = rng.normal(size=(1, 6, 64)).astype(np.float32)
  with pytest.raises(big_vision.CheckpointMismatch, match='square grid'):
    big_vision.model_config(arrays)
  with pytest.raises(big_vision.CheckpointMismatch, match=r'needs \[1, 8, W\]'):
    big_vision.model_config(arrays, big_vision.Options(image_grid=(2, 4)))
  config = big_vision.model_config(arrays, big_vision.Options(image_grid=(2, 3)))
  assert tuple(config.image.posemb_grid) == (2, 3)
  params = big_vision.to_params(arrays, config)
  yx = np.stack(np.divmod(np.arange(6), 3), -1).astype(np.int32)
  table = params['img']['posemb']['pos_embedding']
  module = posemb.make(config.image.posemb, 64, config.image.max_grid,
                       grid_shape=two_towers.posemb_grid(config.image))
  got = module.apply({'params': {'pos_embedding': table}}, yx, np.full_like(yx, (2, 3)))
  np.testing.assert_allclose(got, arrays['img/pos_embedding'][0], atol=1e-6)
  exported = big_vision.from_params(params, config)
  np.testing.assert_array_equal(exported['img/pos_embedding'], arrays['img/pos_embedding'])


def _lit_config(npz):
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')
  config = config_lib.load_config_file(
      os.path.join(configs_dir, 'lit_navit.py') + f':init={npz},source=synthetic')
  config_lib.check_config(config)
  return config


def test_lit_config_takes_a_big_vision_npz():
  npz = bv_fixtures.path('siglip2_naflex', 'params')
  config = _lit_config(npz)
  assert config.init_from == npz and config.init_params == 'img/.*'
  assert config.model.image == big_vision.model_config(big_vision.load_npz(npz)).image
  assert config.model.embed_dim == 64 and config.input.patch_sizes == (16,)
  shapes = two_towers.param_shapes(config.model)['params']
  assert 'head' not in shapes['img'] and shapes['txt']['head']['kernel'].shape[-1] == 64
