"""LiT and the evaluators on big_vision checkpoints (the reference fixtures)."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pyarrow.parquet as pq
import pytest

from lit_navit.interop import big_vision
from lit_navit import checkpoint
from lit_navit.interop import big_vision_export
from lit_navit.interop import big_vision_import
from lit_navit import train
from lit_navit.data import text as text_lib
import bv_fixtures
import tiny_config
from eval_helpers import load_script
from eval_helpers import write_images

pytestmark = pytest.mark.slow




def _flat(tree):
  return {jax.tree_util.keystr(k, simple=True, separator='/'): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _step_params(workdir, step):
  return checkpoint.load_for_inference(
      os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)))[1]


def test_lit_with_an_imported_tower_keeps_it_bitwise_and_trains_the_text(tmp_path):
  # A released file's names: params/img/..., params/t.
  npz = bv_fixtures.prefixed_copy('siglip_vit', 'params/', tmp_path)
  config = tiny_config.get_config('steps=3,every=1')
  big_vision.adopt_tower(config, npz, 'img')
  config.input.resolution.max = 64  # Up to the ViT's 4x4 grid of 16 px patches.
  config.init_from = npz
  config.init_params = 'img/.*'
  config.optim.schedule = [('img/.*', None),
                           ('.*', dict(decay_type='cosine', warmup_steps=1))]
  workdir = str(tmp_path / 'lit')
  train.train(config, workdir)

  imported = _flat(big_vision.to_params(big_vision.load_npz(npz),
                                        big_vision.model_config(big_vision.load_npz(npz))))
  first, last = _flat(_step_params(workdir, 1)), _flat(_step_params(workdir, 3))
  img_keys = [k for k in last if k.startswith('img/')]
  assert img_keys and len(img_keys) == len([k for k in imported if k.startswith('img/')])
  for key in img_keys:
    np.testing.assert_array_equal(first[key], imported[key], err_msg=key)
    np.testing.assert_array_equal(last[key], imported[key], err_msg=key)
  assert not np.array_equal(first['txt/head/kernel'], last['txt/head/kernel'])

  # Zero-shot runs from the result.
  output = str(tmp_path / 'zs.json')
  load_script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--synthetic', '16', '--batch_rows', '4',
      '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    assert 0 <= json.load(f)['results'][0]['top1'] <= 1

  # The trained model exported, read back with numpy alone: the same arrays.
  npz_out = str(tmp_path / 'lit.npz')
  big_vision_export.export_checkpoint(workdir, npz_out)
  trained_config, trained = checkpoint.load_for_inference(workdir)
  with np.load(npz_out, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  np.testing.assert_array_equal(arrays['img/pos_embedding'],
                                imported['img/posemb/pos_embedding'])
  back = _flat(big_vision.to_params(arrays, trained_config.model))
  for key, value in _flat(trained).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.fixture(name='imported', scope='module')
def _imported(tmp_path_factory):
  """Workdirs of both fixtures imported with the synthetic-caption tokenizer."""
  workdirs = {}
  for name in bv_fixtures.NAMES:
    workdir = str(tmp_path_factory.mktemp(name))
    big_vision_import.import_checkpoint(
        bv_fixtures.path(name, 'params'), text_lib.default_tokenizer_path(), workdir,
        max_tokens=16 if name == 'siglip_vit' else 32)
    workdirs[name] = workdir
  return workdirs


def test_zero_shot_script_on_an_imported_vit(imported, tmp_path):
  for n, name in enumerate(('red_circle', 'blue_square')):
    write_images(str(tmp_path / 'data' / name), [(40, 30), (64, 64)], seed=n)
  output = str(tmp_path / 'zs.json')
  load_script('zero_shot_imagenet').main([
      '--checkpoint', imported['siglip_vit'], '--folder', str(tmp_path / 'data'),
      '--templates', '7', '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)['results'][0]
  assert results['max_tokens'] == 16 and results['num_images'] == 4
  assert 0 <= results['top1'] <= results['top5'] == 1.0


def test_retrieval_and_export_scripts_on_an_imported_naflex(imported, tmp_path):
  paths = write_images(str(tmp_path / 'photos' / 'a'), [(48, 32), (20, 50), (64, 64)])
  rows = [{'image': os.path.join('a', os.path.basename(p)), 'captions': [f'image {i}']}
          for i, p in enumerate(paths)]
  data = tmp_path / 'photos' / 'pairs.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  output = str(tmp_path / 'retrieval.json')
  load_script('retrieval').main(['--checkpoint', imported['siglip2_naflex'],
                             '--data', str(data), '--ks', '1,3', '--output', output,
                             '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert results['num_images'] == 3 and results['text_to_image/R@3'] == 1.0

  summary = load_script('export_embeddings').main([
      '--checkpoint', imported['siglip2_naflex'], '--images', str(tmp_path / 'photos'),
      '--output_dir', str(tmp_path / 'export'), '--dtype', 'float32', '--no_progress'])
  assert summary['num_exported'] == 3


def test_export_script_on_the_vit_fixture_photos_gives_big_vision_zimg(imported, tmp_path):
  # The fixture's photos, already 64x64 uint8, as lossless files: the script
  # decodes, sizes (4x4 patches of 16 px: no resize), patchifies and embeds
  # them through the pipeline exactly as it would any photo.
  photos = tmp_path / 'photos'
  photos.mkdir()
  for n, image in enumerate(bv_fixtures.load('siglip_vit', 'inputs')['image_uint8']):
    Image.fromarray(image).save(str(photos / f'{n}.png'))
  out = str(tmp_path / 'export')
  load_script('export_embeddings').main([
      '--checkpoint', imported['siglip_vit'], '--images', str(photos),
      '--output_dir', out, '--dtype', 'float32', '--no_text', '--no_progress'])
  zimg = np.load(os.path.join(out, 'img_emb', 'img_emb_0.npy'))
  names = pq.read_table(os.path.join(out, 'metadata', 'metadata_0.parquet')
                        ).to_pydict()['image_path']
  order = [int(os.path.basename(p).split('.')[0]) for p in names]
  expected = bv_fixtures.load('siglip_vit', 'expected')['zimg'][order]
  assert np.abs(zimg - expected).max() <= 1e-5
