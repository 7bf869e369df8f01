"""Fuzzing with hypothesis: damaged TFRecord and tar shards, arbitrary JSONL
and CSV lists, mutated batches and arbitrary config overrides give records,
counted skips or clean errors that name the file, key or problem; never
another exception, a hang or unbounded memory."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data_fixtures as fx
from lit_navit import config as config_lib
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import sources

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_config.py')
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
PNG = fx.encode(fx.solid((10, 200, 30)), 'PNG')


def _mutate(data: bytes, edits) -> bytes:
  """Overwrites bytes at (position, value) pairs: damage anywhere."""
  out = bytearray(data)
  for position, value in edits:
    out[position % len(out)] = value
  return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


def _read_all(source):
  """Every record of a source; each must come back (maybe with `error`)."""
  for i in range(len(source)):
    record = source[i]
    assert isinstance(record.image, bytes) and isinstance(record.caption, str)
    assert len(record.image) <= 1 << 20  # bounded by what the file holds


@pytest.fixture(scope='module', name='valid_tfrecord')
def _valid_tfrecord(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfr') / 'a.tfrecord')
  fx.write_tfrecord(path, [fx.make_example({'jpg': PNG, 'txt': f'caption {i}',
                                            'key': f'{i:03d}'}) for i in range(3)])
  with open(path, 'rb') as f:
    return f.read()


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 1 << 12))
def test_damaged_tfrecord_shards(valid_tfrecord, edits, cut):
  data = _mutate(valid_tfrecord, edits)[:max(cut, 1)]
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'x.tfrecord')
    with open(path, 'wb') as f:
      f.write(data)
    _read_all(sources.TFRecordSource(path))


@pytest.fixture(scope='module', name='valid_tar')
def _valid_tar(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tar') / 'a.tar')
  fx.write_tar(path, [(f'{i:03d}.{ext}', data) for i in range(3)
                      for ext, data in (('png', PNG), ('txt', b'caption'))])
  with open(path, 'rb') as f:
    return f.read()


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 1 << 14))
def test_damaged_tar_shards(valid_tar, edits, cut):
  data = _mutate(valid_tar, edits)[:max(cut, 1)]
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'x.tar')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      source = sources.WebDatasetSource(path)
    except ValueError as e:
      assert path in str(e)
      return
    _read_all(source)


@FUZZ
@given(text=st.text(max_size=400), extension=st.sampled_from(['.jsonl', '.csv', '.tsv']))
def test_arbitrary_file_lists(text, extension):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'list' + extension)
    with open(path, 'w', encoding='utf-8', errors='surrogateescape') as f:
      f.write(text)
    try:
      source = sources.FileListSource(path)
    except ValueError as e:
      assert path in str(e)
      return
    _read_all(source)


@pytest.fixture(scope='module', name='valid_batch')
def _valid_batch():
  config = config_lib.load_config_file(TINY)
  source = sources.make_source(config.input.source)
  with trainer_lib.make_pipeline(config, source, rows=2, process_index=0,
                                 process_count=1) as pipeline:
    batch = {k: np.asarray(v) for k, v in next(pipeline).items()}
  batch_lib.validate_batch(batch)
  return batch


VALUES = st.one_of(st.integers(-(1 << 40), 1 << 40),
                   st.floats(allow_nan=True, allow_infinity=True))


@FUZZ
@given(data=st.data())
def test_mutated_batches(valid_batch, data):
  batch = {k: v.copy() for k, v in valid_batch.items()}
  key = data.draw(st.sampled_from(sorted(batch)))
  change = data.draw(st.sampled_from(['value', 'shape', 'dtype', 'drop']))
  if change == 'value':
    flat = batch[key].reshape(-1)
    position = data.draw(st.integers(0, flat.size - 1))
    value = data.draw(VALUES)
    try:
      flat[position] = value
    except (OverflowError, ValueError):
      return  # the value does not fit the dtype: nothing to validate
  elif change == 'shape':
    axis = data.draw(st.integers(0, batch[key].ndim - 1))
    batch[key] = np.delete(batch[key], 0, axis=axis)
  elif change == 'dtype':
    batch[key] = batch[key].astype(data.draw(st.sampled_from(
        [np.int16, np.int64, np.float16, np.float64, np.uint8])))
  else:
    del batch[key]
  try:
    batch_lib.validate_batch(batch, batch_lib.spec_of(valid_batch))
  except ValueError as e:
    assert str(e)


KEYS = st.one_of(st.sampled_from(['mesh', 'input.patch_sizes', 'model.t_init',
                                  'checkpoint.every', 'optim.schedule', 'input',
                                  'input.resolution.max_tokens', 'seed']),
                 st.text(max_size=20))


@FUZZ
@given(key=KEYS, text=st.text(max_size=60))
def test_arbitrary_config_overrides(key, text):
  config = config_lib.load_config_file(TINY)
  try:
    config_lib.apply_overrides(config, [(key, text)])
    config_lib.check_config(config)
  except ValueError as e:
    assert str(e)
