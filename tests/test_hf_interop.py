"""transformers' SiglipModel / Siglip2Model in and out, against transformers' own code.

Tiny random models from transformers' config classes (nothing from a hub).
The bar: our embeddings equal get_image_features / get_text_features and the
logits match to 1e-5 (float32, CPU), both directions, for SigLIP (a conv
stem at a fixed size) and SigLIP 2 NaFlex, whose patches, spatial_shapes
and pixel_attention_mask come from transformers' Siglip2ImageProcessor.
"""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit.data import decode
from lit_navit.data import patches as patches_lib
from lit_navit.data import resolution
from lit_navit.data import text as text_lib
from lit_navit.interop import big_vision
from lit_navit.interop import big_vision_export
from lit_navit.interop import hf
from lit_navit.interop import hf_export
from lit_navit.interop import hf_import
from lit_navit.interop import workdir as workdir_lib
from lit_navit.models import two_towers

TOL = 1e-5
PATCH, GRID, TEXT_LEN = 8, 4, 16
KINDS = ('siglip', 'siglip2')


def _hf_config(kind):
  vocab = text_lib.Tokenizer(text_lib.default_tokenizer_path(), 1).vocab_size
  size = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4)
  text = dict(size, vocab_size=vocab, max_position_embeddings=TEXT_LEN,
              projection_size=32)
  vision = dict(size, patch_size=PATCH)
  if kind == 'siglip2':
    return transformers.Siglip2Config(text_config=text,
                                      vision_config=dict(vision, num_patches=GRID * GRID))
  return transformers.SiglipConfig(text_config=text,
                                   vision_config=dict(vision, image_size=GRID * PATCH))


def _random_hf_model(kind, seed=0):
  torch.manual_seed(seed)
  config = _hf_config(kind)
  model = (transformers.Siglip2Model if kind == 'siglip2' else transformers.SiglipModel)(config)
  with torch.no_grad():  # Every tensor random, LayerNorms and biases included.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model.eval()


@pytest.fixture(scope='module')
def hf_folders(tmp_path_factory):
  """{kind: a saved random transformers model's folder}."""
  folders = {}
  for kind in KINDS:
    folder = str(tmp_path_factory.mktemp(kind))
    _random_hf_model(kind).save_pretrained(folder)
    folders[kind] = folder
  return folders


@pytest.fixture(scope='module')
def imported(hf_folders, tmp_path_factory):
  """{kind: workdir} of each folder imported with the repo's tokenizer."""
  out = {}
  for kind, folder in hf_folders.items():
    workdir = str(tmp_path_factory.mktemp(f'{kind}_workdir'))
    hf_import.import_folder(folder, workdir, tokenizer=text_lib.default_tokenizer_path())
    out[kind] = workdir
  return out


def _images(kind, rng):
  """(our batch, transformers' image kwargs) of the same images."""
  if kind == 'siglip':
    images = rng.uniform(-1, 1, size=(3, GRID * PATCH, GRID * PATCH, 3)).astype(np.float32)
    return (big_vision.image_batch(images, PATCH),
            dict(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())))
  sizes = [(40, 24), (17, 61), (32, 32)]  # (height, width): grids of different shapes.
  images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
  processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=GRID * GRID)
  inputs = processor(images=images, return_tensors='pt')
  return _our_naflex_batch(inputs), dict(inputs)


def _our_naflex_batch(inputs):
  """Our packed batch (one image a row) of Siglip2ImageProcessor outputs."""
  shapes = inputs['spatial_shapes'].numpy()
  mask = inputs['pixel_attention_mask'].numpy().astype(np.int32)
  length = mask.shape[1]
  yx = np.zeros((len(shapes), length, 2), np.int32)
  for i, (rows, cols) in enumerate(shapes):
    yy, xx = np.divmod(np.arange(rows * cols), cols)
    yx[i, :rows * cols] = np.stack([yy, xx], -1)
  return {'image/patches': inputs['pixel_values'].numpy().astype(np.float32),
          'image/yx': yx, 'image/segment': mask,
          'image/grid': shapes[:, None].astype(np.int32)}


def _ours(config, params, batch, tokens):
  """(unnormalised image embeddings, text embeddings, logits) from our model."""
  model = two_towers.TwoTowers(config)
  variables = {'params': params}
  # Jitted: eager flax takes seconds per call even on this tiny model.
  img = np.asarray(jax.jit(lambda v, b: model.apply(
      v, b, method=lambda m, b: m._slot_embeddings(b)))(variables, batch))[:, 0]
  txt = np.asarray(jax.jit(lambda v, t: model.apply(
      v, t, method=lambda m, t: m.txt(t)))(variables, tokens))
  norm = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
  logits = norm(img) @ norm(txt).T * np.exp(params['t'][0]) + params['b'][0]
  return img, txt, logits


def _theirs(model, image_inputs, tokens):
  with torch.no_grad():
    img = model.get_image_features(**image_inputs).pooler_output.numpy()
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long()).pooler_output.numpy()
    out = model(input_ids=torch.from_numpy(tokens).long(), **image_inputs)
  return img, txt, out.logits_per_image.numpy()


def _tokens(config):
  tokenizer = text_lib.Tokenizer.from_config(config.input)
  return tokenizer.encode(['a red circle', 'two blue squares on a green field',
                           'a big yellow triangle ' * 6])


def _assert_close(ours, theirs):
  for name, a, b in zip(('image', 'text', 'logits'), ours, theirs):
    assert a.shape == b.shape, name
    assert np.abs(a - b).max() <= TOL, (name, np.abs(a - b).max())


@pytest.mark.parametrize('kind', KINDS)
def test_imported_model_gives_transformers_embeddings_and_logits(kind, hf_folders, imported):
  config, params = checkpoint.load_for_inference(imported[kind])
  model = transformers.AutoModel.from_pretrained(hf_folders[kind])
  assert type(model).__name__ == hf.ARCHITECTURES[kind]
  batch, image_inputs = _images(kind, np.random.default_rng(0))
  tokens = _tokens(config)
  _assert_close(_ours(config.model, params, batch, tokens),
                _theirs(model, image_inputs, tokens))


def _random_params(config, seed):
  """Fresh random params of `config` (LayerNorms and biases too)."""
  shapes = two_towers.param_shapes(config)['params']
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [(rng.normal(size=s.shape) * 0.2).astype(np.float32)
                                   for s in leaves])


@pytest.mark.parametrize('kind', KINDS)
def test_exported_model_gives_our_embeddings_and_logits_in_transformers(
    kind, imported, tmp_path):
  config, _ = checkpoint.load_for_inference(imported[kind])
  params = _random_params(config.model, seed=1)
  saver = checkpoint.Checkpointer(str(tmp_path / 'ours'), keep=1, async_save=False)
  saver.save(0, {'params': params}, {}, config)
  saver.close()
  folder = str(tmp_path / 'hf')
  hf_export.export_checkpoint(str(tmp_path / 'ours'), folder)
  model = transformers.AutoModel.from_pretrained(folder)
  # Every tensor transformers expects, and nothing else.
  written = safetensors_numpy.load_file(os.path.join(folder, 'model.safetensors'))
  assert sorted(written) == sorted(model.state_dict())
  batch, image_inputs = _images(kind, np.random.default_rng(1))
  tokens = _tokens(config)
  _assert_close(_ours(config.model, params, batch, tokens),
                _theirs(model, image_inputs, tokens))
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  assert type(processor).__name__.startswith(
      'Siglip2ImageProcessor' if kind == 'siglip2' else 'SiglipImageProcessor')


@pytest.mark.parametrize('kind', KINDS)
def test_hf_to_ours_to_hf_gives_identical_tensors(kind, hf_folders, imported, tmp_path):
  folder = str(tmp_path / 'again')
  hf_export.export_checkpoint(imported[kind], folder)
  before = safetensors_numpy.load_file(os.path.join(hf_folders[kind], 'model.safetensors'))
  after = safetensors_numpy.load_file(os.path.join(folder, 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for key in before:
    assert after[key].dtype == before[key].dtype, key
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # Our export imports back with its own tokenizer files and settings.
  hf_import.import_folder(folder, str(tmp_path / 'back'))
  first, params = checkpoint.load_for_inference(imported[kind])
  back, again = checkpoint.load_for_inference(str(tmp_path / 'back'))
  assert back.input.tokenizer == str(tmp_path / 'back' / 'tokenizer.model')
  for key in ('pad_id', 'lowercase', 'sticky_eos', 'text_len'):
    assert back.input[key] == first.input[key], key
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # And big_vision's layout holds it too.
  npz = str(tmp_path / 'bv.npz')
  big_vision_export.export_checkpoint(imported[kind], npz)
  arrays = big_vision.load_npz(npz)
  jax.tree.map(np.testing.assert_array_equal,
               big_vision.to_params(arrays, big_vision.model_config(arrays)), params)
  config = json.load(open(os.path.join(folder, 'config.json'), encoding='utf-8'))
  original = json.load(open(os.path.join(hf_folders[kind], 'config.json'), encoding='utf-8'))
  for tower in ('text_config', 'vision_config'):
    for key, value in config[tower].items():
      if key in original[tower] and key not in ('pad_token_id', 'eos_token_id',
                                                'bos_token_id'):
        assert original[tower][key] == value, (tower, key)


@pytest.mark.parametrize('kind', KINDS)
def test_exported_tokenizer_tokenizes_as_we_do(kind, imported, tmp_path):
  config, _ = checkpoint.load_for_inference(imported[kind])
  folder = str(tmp_path / 'hf')
  hf_export.export_checkpoint(imported[kind], folder)
  # AutoTokenizer makes every siglip2 folder a Gemma Siglip2Tokenizer (it
  # needs a tokenizer.json); there, SiglipTokenizer reads our files.
  load = (transformers.SiglipTokenizer if kind == 'siglip2'
          else transformers.AutoTokenizer).from_pretrained
  theirs = load(folder)
  assert type(theirs).__name__ == 'SiglipTokenizer'
  # Lowercased, EOS appended, padded with our pad (1 for siglip, 0 for
  # siglip2), a cut caption keeps EOS.
  captions = ['A Red circle', 'two blue squares on a green field',
              'a big yellow triangle ' * 6, '']
  ours = text_lib.Tokenizer.from_config(config.input).encode(captions)
  got = theirs(captions, padding='max_length', truncation=True,
               max_length=config.input.text_len)['input_ids']
  np.testing.assert_array_equal(np.asarray(got), ours)


def _png(rng, height, width):
  """A smooth random photo-like image, as PNG bytes."""
  small = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
  out = io.BytesIO()
  image.save(out, format='PNG')
  return out.getvalue()


def test_an_image_file_embeds_alike_through_our_resize_and_transformers(imported, tmp_path):
  """NaFlex: our sizing and PIL resize vs Siglip2ImageProcessor's."""
  config, params = checkpoint.load_for_inference(imported['siglip2'])
  folder = str(tmp_path / 'hf')
  hf_export.export_checkpoint(imported['siglip2'], folder)
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  model = transformers.AutoModel.from_pretrained(folder)
  rng = np.random.default_rng(0)
  assert processor.max_num_patches == config.input.resolution.max_tokens
  for height, width in ((120, 72), (33, 100)):
    image = decode.decode_image(_png(rng, height, width))
    grid = resolution.grid_for_budget(height, width, processor.max_num_patches)
    resized = patches_lib.resize_image(image, (grid[0] * PATCH, grid[1] * PATCH))
    p = patches_lib.patchify(resized, PATCH)
    batch = {'image/patches': p.pixels[None], 'image/yx': p.yx[None],
             'image/segment': np.ones((1, len(p)), np.int32),
             'image/grid': np.array([[grid]], np.int32)}
    inputs = processor(images=[image], return_tensors='pt')
    assert tuple(inputs['spatial_shapes'][0].tolist()) == grid
    ours = _ours(config.model, params, batch, _tokens(config)[:1])[0]
    with torch.no_grad():
      theirs = model.get_image_features(**inputs).pooler_output.numpy()
    norm = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
    assert np.abs(norm(ours) - norm(theirs)).max() <= 1e-4, (height, width)


def test_what_transformers_lacks_is_refused_naming_the_option(imported):
  config, _ = checkpoint.load_for_inference(imported['siglip'])
  model = config.model
  model.image.head = True
  model.image.qk_norm = True
  model.text.pool = 'mean'
  with pytest.raises(hf.Unsupported, match=r"image.head=True .*text.pool 'mean'.*image.qk_norm"):
    hf.check_exportable(model)
  model = config.model
  model.image.head, model.image.qk_norm, model.text.pool = False, False, 'last'
  model.image.posemb = 'learn_factorized'
  with pytest.raises(hf.Unsupported, match='image.posemb'):
    hf.check_exportable(model)


def _cli(module, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', module, *args], env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('module,args,message', [
    ('lit_navit.interop.big_vision_import', ['--text_pool', 'tok'], "text_pool 'tok'"),
    ('lit_navit.interop.hf_import', ['--recipe', 'nope'], 'argument --recipe'),
    ('lit_navit.interop.hf_import', [], 'model_type'),
    ('lit_navit.interop.hf_import', ['siglip'], 'not a readable safetensors file'),
    ('lit_navit.interop.hf_export', [], 'does not exist'),
    ('lit_navit.interop.big_vision_export', ['--scan', 'sideways'], 'argument --scan'),
])
def test_interop_user_errors_are_one_line_with_exit_status_2(module, args, message, tmp_path):
  import bv_fixtures  # pylint: disable=g-import-not-at-top
  # The folder hf_import reads: a CLIP config, or (args ['siglip']) a SigLIP
  # one whose weights are junk.
  model_type = 'siglip' if args == ['siglip'] else 'clip'
  args = [] if args == ['siglip'] else args
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': model_type}))
  (tmp_path / 'model.safetensors').write_bytes(b'')
  paths = {'lit_navit.interop.big_vision_import': [
               '--npz', bv_fixtures.path('siglip_vit', 'params'), '--tokenizer',
               text_lib.default_tokenizer_path(), '--workdir', str(tmp_path / 'w')],
           'lit_navit.interop.hf_import': ['--model', str(tmp_path), '--workdir',
                                           str(tmp_path / 'w')],
           'lit_navit.interop.hf_export': ['--checkpoint', str(tmp_path / 'none'),
                                           '--out', str(tmp_path / 'out')],
           'lit_navit.interop.big_vision_export': ['--checkpoint', str(tmp_path / 'none'),
                                                   '--npz', str(tmp_path / 'out.npz')]}
  proc = _cli(module, *paths[module], *args)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_export_script_on_an_hf_import_gives_transformers_embeddings_of_image_files(
    kind, hf_folders, imported, tmp_path):
  """The eval script's decode, sizing and resize vs transformers' processor,
  on image files: NaFlex with --resize fit, SigLIP with --resize square
  (both squash to the trained square)."""
  from eval_helpers import load_script  # pylint: disable=g-import-not-at-top
  photos = tmp_path / 'photos'
  photos.mkdir()
  rng = np.random.default_rng(0)
  sizes = [(120, 72), (33, 100), (300, 200)] if kind == 'siglip2' else [(50, 50), (20, 20), (60, 24)]
  for n, (height, width) in enumerate(sizes):
    (photos / f'{n}.png').write_bytes(_png(rng, height, width))
  out = str(tmp_path / 'export')
  load_script('export_embeddings').main([
      '--checkpoint', imported[kind], '--images', str(photos), '--output_dir', out,
      '--dtype', 'float32', '--no_text', '--no_progress']
      + (['--resize', 'fit'] if kind == 'siglip2' else
         ['--resize', 'square', '--max_tokens', str(GRID * GRID)]))
  zimg = np.load(os.path.join(out, 'img_emb', 'img_emb_0.npy'))
  names = pq_names(os.path.join(out, 'metadata', 'metadata_0.parquet'))
  if kind == 'siglip2':
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=256)
  else:
    processor = transformers.SiglipImageProcessor(
        size=dict(height=GRID * PATCH, width=GRID * PATCH), resample=2)
  model = transformers.AutoModel.from_pretrained(hf_folders[kind])
  images = [decode.decode_image(open(p, 'rb').read()) for p in names]
  with torch.no_grad():
    theirs = model.get_image_features(**processor(images=images, return_tensors='pt')
                                      ).pooler_output.numpy()
  theirs /= np.linalg.norm(theirs, axis=-1, keepdims=True)
  assert np.abs(zimg - theirs).max() <= 1e-4


def pq_names(path):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.read_table(path).to_pydict()['image_path']


@pytest.mark.slow
def test_lit_from_an_hf_import_keeps_its_image_tower(imported, tmp_path):
  import tiny_config  # pylint: disable=g-import-not-at-top
  from lit_navit import train  # pylint: disable=g-import-not-at-top
  workdir = imported['siglip2']
  source, params = checkpoint.load_for_inference(workdir)
  # configs/lit_navit.py:init=WORKDIR adopts the locked tower's config.
  lit = config_lib.load_config_file(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
      'lit_navit.py') + f':init={workdir},source=synthetic')
  config_lib.check_config(lit)
  assert lit.model.image == source.model.image
  assert lit.model.embed_dim == 32 and lit.input.patch_sizes == (PATCH,)
  config = tiny_config.get_config('steps=2,every=1')
  workdir_lib.adopt_tower(config, workdir, 'img')
  config.init_from = workdir
  config.init_params = 'img/.*'
  config.optim.schedule = [('img/.*', None), ('.*', dict(decay_type='cosine', warmup_steps=1))]
  out = str(tmp_path / 'lit')
  train.train(config, out)
  _, trained = checkpoint.load_for_inference(out)
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  ours, theirs = flat(trained['img']), flat(params['img'])
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_a_folder_that_does_not_fit_is_refused_naming_the_tensor(hf_folders, tmp_path):
  state = safetensors_numpy.load_file(os.path.join(hf_folders['siglip'], 'model.safetensors'))
  config = json.load(open(os.path.join(hf_folders['siglip'], 'config.json'), encoding='utf-8'))
  extra = dict(state, **{'classifier.weight': np.ones((3, 32), np.float32)})
  with pytest.raises(ValueError, match="lacks: classifier.weight"):
    hf.from_hf(extra, config)
  missing = {k: v for k, v in state.items() if k != 'text_model.head.bias'}
  with pytest.raises(ValueError, match="no 'text_model.head.bias'"):
    hf.from_hf(missing, config)
  with pytest.raises(hf.Unsupported, match='hidden_act'):
    hf.from_hf(state, dict(config, text_config=dict(config['text_config'], hidden_act='relu')))


def test_import_takes_pad_and_case_from_the_folders_tokenizer_config(hf_folders, tmp_path):
  folder = tmp_path / 'hf'
  folder.mkdir()
  for name in ('config.json', 'model.safetensors'):
    (folder / name).write_bytes(open(os.path.join(hf_folders['siglip'], name), 'rb').read())
  (folder / 'spiece.model').write_bytes(open(text_lib.default_tokenizer_path(), 'rb').read())
  # The siglip recipe would pad with 1 and lowercase.
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'pad_token': {'content': '<pad>'}, 'do_lower_case': False}))
  config, _ = hf_import.import_folder(str(folder), str(tmp_path / 'w'))
  assert config.input.pad_id == 0 and config.model.text.pad_id == 0
  assert not config.input.lowercase
  (folder / 'tokenizer_config.json').write_text(json.dumps({'pad_token': '<nope>'}))
  config, _ = hf_import.import_folder(str(folder), str(tmp_path / 'w2'))
  assert config.input.pad_id == 1 and config.input.lowercase


def test_a_sharded_folder_imports_as_the_single_file(hf_folders, imported, tmp_path):
  folder = tmp_path / 'sharded'
  folder.mkdir()
  (folder / 'config.json').write_bytes(
      open(os.path.join(hf_folders['siglip2'], 'config.json'), 'rb').read())
  transformers.AutoModel.from_pretrained(hf_folders['siglip2']).save_pretrained(
      str(folder), max_shard_size='20KB')
  assert not (folder / 'model.safetensors').exists()
  assert len(list(folder.glob('model-*.safetensors'))) > 1
  _, params, _ = hf_import.load(str(folder))
  _, expected = checkpoint.load_for_inference(imported['siglip2'])
  jax.tree.map(np.testing.assert_array_equal, params, expected)
