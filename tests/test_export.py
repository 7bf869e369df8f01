"""Embedding export: clip-retrieval layout, resume, failures, query."""

import importlib.util
import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from lit_navit.data import sources
from lit_navit.evaluate import datasets
from lit_navit.evaluate import export
from eval_helpers import tiny_embedder, write_images

SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16), (20, 20), (8, 40),
         (33, 17), (50, 25), (12, 12)]


def _mtimes(folder):
  return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
          for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(name='images')
def _images(tmp_path):
  """Ten images and a corrupt one (index 4), with captions."""
  paths = write_images(str(tmp_path / 'images'), SIZES)
  corrupt = tmp_path / 'images' / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 truncated')
  paths.insert(4, str(corrupt))
  captions = [f'photo {i}' for i in range(len(paths))]
  return datasets.ImageFiles(paths, captions)


def test_export_layout_failures_and_resume(tmp_path, images):
  out = str(tmp_path / 'export')
  embedder = tiny_embedder()
  summary = export.export(embedder, images, out, part_size=4, texts=True,
                          key_column='image_path', progress=False)
  assert summary['num_images'] == 11 and summary['num_failed'] == 1
  assert summary['parts_written'] == 3 and summary['parts_skipped'] == 0
  assert sorted(os.listdir(os.path.join(out, 'img_emb'))) == [
      'img_emb_0.npy', 'img_emb_1.npy', 'img_emb_2.npy']
  assert sorted(os.listdir(os.path.join(out, 'text_emb'))) == [
      'text_emb_0.npy', 'text_emb_1.npy', 'text_emb_2.npy']
  # Each part's embedding rows line up with its metadata rows: row r holds
  # the embeddings of the image and caption at metadata index r.
  own_img, _ = embedder.images(images, progress=False)
  own_txt = embedder.texts(images.captions)
  rows = 0
  for n in range(3):
    img = np.load(os.path.join(out, 'img_emb', f'img_emb_{n}.npy'))
    txt = np.load(os.path.join(out, 'text_emb', f'text_emb_{n}.npy'))
    meta = pq.read_table(os.path.join(out, 'metadata', f'metadata_{n}.parquet'))
    assert img.dtype == np.float16 and img.shape == txt.shape
    assert meta.num_rows == len(img)
    index = meta.column('index').to_pylist()
    np.testing.assert_allclose(img.astype(np.float32), own_img[index], atol=2e-3)
    np.testing.assert_allclose(txt.astype(np.float32), own_txt[index], atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1),
                               1.0, atol=2e-3)
    rows += len(img)
  assert rows == 10
  part1 = pq.read_table(os.path.join(out, 'metadata', 'metadata_1.parquet')).to_pydict()
  # Part 1 covers indices 4..7; index 4 (the corrupt file) is left out.
  assert part1['index'] == [5, 6, 7]
  assert part1['image_path'] == [images.paths[i] for i in (5, 6, 7)]
  assert part1['caption'] == ['photo 5', 'photo 6', 'photo 7']
  with open(os.path.join(out, 'failed.jsonl'), encoding='utf-8') as f:
    failed = [json.loads(line) for line in f]
  assert len(failed) == 1 and failed[0]['index'] == 4
  assert failed[0]['key'].endswith('corrupt.jpg') and failed[0]['reason']

  # A rerun finds every part done and touches none of them.
  before = _mtimes(os.path.join(out, 'img_emb'))
  again = export.export(embedder, images, out, part_size=4, texts=True,
                        key_column='image_path', progress=False)
  assert again['parts_written'] == 0 and again['parts_skipped'] == 3
  assert _mtimes(os.path.join(out, 'img_emb')) == before

  # A part cut short (its metadata missing) is redone; the others are kept.
  os.remove(os.path.join(out, 'metadata', 'metadata_2.parquet'))
  again = export.export(embedder, images, out, part_size=4, texts=True,
                        key_column='image_path', progress=False)
  assert again['parts_written'] == 1 and again['parts_skipped'] == 2
  after = _mtimes(os.path.join(out, 'img_emb'))
  for n in (0, 1):
    path = os.path.join(out, 'img_emb', f'img_emb_{n}.npy')
    assert after[path] == before[path]
  assert not [n for n in os.listdir(os.path.join(out, 'img_emb')) if '.tmp' in n]
  assert again['num_failed'] == 1

  with pytest.raises(ValueError, match='part_size'):
    export.export(embedder, images, out, part_size=5, texts=True,
                  key_column='image_path', progress=False)
  # Other weights must not add parts to this export either.
  other = tiny_embedder()
  other.params = jax.tree.map(lambda x: x + 1, other.params)
  with pytest.raises(ValueError, match='params_sha256'):
    export.export(other, images, out, part_size=4, texts=True,
                  key_column='image_path', progress=False)


@pytest.mark.parametrize('resize', ['fit', 'native', 'square'])
def test_query_finds_each_image_by_its_own_embedding(tmp_path, images, resize):
  out = str(tmp_path / 'export')
  embedder = tiny_embedder(resize=resize)
  export.export(embedder, images, out, part_size=3, dtype='float32',
                texts=True, key_column='image_path', progress=False)
  # Embedding an image again, alone, must find that image first: the export
  # kept rows and metadata aligned across parts, packed or not.
  for i in (0, 3, 9, 10):
    emb, _ = embedder.images(datasets.ImageFiles([images.paths[i]]), progress=False)
    hits = export.query(out, emb[0], k=3)
    assert hits[0]['image_path'] == images.paths[i]
    assert hits[0]['score'] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]['score'] >= hits[1]['score'] >= hits[2]['score']
  # A caption finds its own exported caption among the texts.
  hits = export.query(out, embedder.texts(['photo 7']), k=1, kind='text')[0]
  assert hits[0]['caption'] == 'photo 7'


class _ConstructedEmbedder:
  """Image k and the caption 'image k' both embed as basis vector k."""
  dim, patch_size, max_tokens, resize, params = 8, 16, 256, 'fit', {}

  def images(self, source, progress=False):
    del progress
    emb = np.zeros((len(source), self.dim), np.float32)
    for i in range(len(source)):
      emb[i, int(source[i].key.split('_')[-1])] = 1.0
    return emb, []

  def texts(self, texts):
    emb = np.zeros((len(texts), self.dim), np.float32)
    for row, text in enumerate(texts):
      emb[row, int(text.split()[-1])] = 1.0
    return emb


class _Keys:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return sources.Record(index, b'', f'caption {index}', f'key_{index}')


def test_caption_query_returns_its_image_across_parts(tmp_path):
  out = str(tmp_path / 'export')
  embedder = _ConstructedEmbedder()
  export.export(embedder, _Keys(8), out, part_size=3, texts=False,
                progress=False)
  for k in range(8):
    hits = export.query(out, embedder.texts([f'image {k}'])[0], k=2)
    assert hits[0]['key'] == f'key_{k}' and hits[0]['index'] == k
    assert hits[0]['score'] == 1.0
    # The rest tie at 0: the earliest part and row wins.
    assert hits[1]['index'] == (1 if k == 0 else 0)
  many = export.query(out, embedder.texts(['image 2', 'image 6']), k=1)
  assert [h[0]['key'] for h in many] == ['key_2', 'key_6']


def test_query_of_missing_export_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='img_emb'):
    export.query(str(tmp_path), np.ones(4), k=1)


def _script_args(name, argv):
  """`parse_args(argv)` of eval/{name}.py."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'eval', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.parse_args(argv)


def test_export_resizes_native_by_default_zero_shot_fits():
  args = _script_args('export_embeddings', ['--checkpoint', 'c', '--images', 'i',
                                            '--output_dir', 'o'])
  assert args.resize == 'native'
  args = _script_args('zero_shot_imagenet', ['--checkpoint', 'c', '--folder', 'f'])
  assert args.resize == 'fit'
  args = _script_args('retrieval', ['--checkpoint', 'c', '--data', 'd',
                                    '--resize', 'native'])
  assert args.resize == 'native'
  # None: eval/query.py takes the export's setting.
  assert _script_args('query', ['--checkpoint', 'c', '--index', 'x']).resize is None
