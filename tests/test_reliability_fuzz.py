"""Fuzzing with hypothesis: damaged TFRecord and tar shards, arbitrary JSONL
and CSV lists, mutated batches and arbitrary config overrides. Each test
knows what its input should give: the records a damaged shard still holds
and the damage counted in `skipped`, a mutated batch or an override rejected
when it breaks the contract and accepted when it keeps it; never another
exception, a hang or unbounded memory."""

import ast
import io
import os
import struct
import tarfile
import tempfile

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
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


def _damage_to_tfrecord(valid, data):
  """What reading `data`, a damaged copy of the TFRecord file `valid`, must
  report: (records kept, whether each kept payload is intact, whether a
  damaged or truncated tail must be counted in `skipped`).

  The walk stops at the first length header that is cut short or changed
  (its CRC fails) or whose record runs past the end of the file; a payload
  can be damaged without stopping it.
  """
  kept, offset = [], 0
  while offset < len(valid):
    length, = struct.unpack('<Q', valid[offset:offset + 8])
    payload, end = offset + 12, offset + 12 + length + 4
    if offset == len(data):
      return len(kept), kept, False  # cut exactly between records
    if data[offset:payload] != valid[offset:payload] or end > len(data):
      return len(kept), kept, True
    kept.append(data[payload:end - 4] == valid[payload:end - 4])
    offset = end
  return len(kept), kept, False


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 1 << 12))
def test_damaged_tfrecord_shards(valid_tfrecord, edits, cut):
  data = _mutate(valid_tfrecord, edits)[:max(cut, 1)]
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'x.tfrecord')
    with open(path, 'wb') as f:
      f.write(data)
    source = sources.TFRecordSource(path)
    _read_all(source)
    kept, intact, damaged_tail = _damage_to_tfrecord(valid_tfrecord, data)
    assert len(source) == kept
    assert sum(source.skipped.values()) == damaged_tail
    for i, whole in enumerate(intact):
      record = source[i]
      if whole:
        assert (record.image, record.caption, record.error) == (PNG, f'caption {i}', '')
      else:  # a damaged payload: either it still parses, or the record says why not
        assert bool(record.error) == (record.image == b'')


@pytest.fixture(scope='module', name='valid_tar')
def _valid_tar(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tar') / 'a.tar')
  fx.write_tar(path, [(f'{i:03d}.{ext}', data) for i in range(3)
                      for ext, data in (('png', PNG), ('txt', b'caption'))])
  with open(path, 'rb') as f:
    return f.read()


def _tar_record_ends(valid):
  """The byte offset where each record's last member ends, in order."""
  with tarfile.open(fileobj=io.BytesIO(valid)) as tar:
    members = tar.getmembers()
  return [m.offset_data + m.size for m in members[1::2]]


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 1 << 14))
def test_damaged_tar_shards(valid_tar, edits, cut):
  data = _mutate(valid_tar, edits)[:max(cut, 1)]
  first_damage = next((i for i, (a, b) in enumerate(zip(data, valid_tar)) if a != b),
                      len(data))
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'x.tar')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      source = sources.WebDatasetSource(path)
    except ValueError as e:
      assert path in str(e) and first_damage < tarfile.BLOCKSIZE
      return
    _read_all(source)
    # Records wholly before the first damaged byte come back as written ...
    before = sum(end <= first_damage for end in _tar_record_ends(valid_tar))
    assert len(source) >= before
    for i in range(before):
      record = source[i]
      assert (record.image, record.caption, record.key) == (PNG, 'caption',
                                                            f'{path}:{i:03d}')
    # ... and a record lost is a record counted.
    if len(source) < 3:
      assert sum(source.skipped.values()) >= 1
    if data == valid_tar:
      assert len(source) == 3 and not source.skipped


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
  config.input.images_per_row = 8  # so that slots and caption rows stay empty
  source = sources.make_source(config.input.source)
  with trainer_lib.make_pipeline(config, source, rows=2, process_index=0,
                                 process_count=1) as pipeline:
    batch = {k: np.asarray(v) for k, v in next(pipeline).items()}
  batch_lib.validate_batch(batch)
  # Every kind of position the mutations below aim at is present.
  assert np.any(batch['image/segment'] == 0) and not batch['valid'].all()
  assert not batch['text/valid'].all()
  return batch


INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
IN_RANGE = st.floats(-1, 1, width=32)
OUT_OF_RANGE = st.floats(width=32).filter(lambda v: not -1 <= v <= 1)


def _pick(data, mask):
  """A drawn index (tuple) where `mask` holds."""
  return tuple(data.draw(st.sampled_from(np.argwhere(mask).tolist())))


def _slot_yx_max(batch, r, k, c):
  """The largest yx component c among slot k's tokens in row r."""
  return batch['image/yx'][r, batch['image/segment'][r] == k + 1, c].max()


# Each mutation changes a valid batch; `True` marks those that keep it valid.
def _drop(batch, data):
  del batch[data.draw(st.sampled_from(sorted(batch)))]


def _reshape(batch, data):
  key = data.draw(st.sampled_from(sorted(batch)))
  axis = data.draw(st.integers(0, batch[key].ndim - 1))
  batch[key] = np.delete(batch[key], 0, axis=axis)


def _retype(batch, data):
  key = data.draw(st.sampled_from(sorted(batch)))
  dtype = data.draw(st.sampled_from([np.int16, np.int32, np.int64, np.float16,
                                     np.float32, np.float64, np.uint8, np.bool_])
                    .filter(lambda d: d != batch[key].dtype))
  batch[key] = batch[key].astype(dtype)


def _pixel_out_of_range(batch, data):
  batch['image/patches'].flat[data.draw(st.integers(
      0, batch['image/patches'].size - 1))] = data.draw(OUT_OF_RANGE)


def _pixel_on_padding(batch, data):
  r, l = _pick(data, batch['image/segment'] == 0)
  i = data.draw(st.integers(0, batch['image/patches'].shape[-1] - 1))
  batch['image/patches'][r, l, i] = data.draw(IN_RANGE.filter(bool))


def _pixel_in_range(batch, data):
  r, l = _pick(data, batch['image/segment'] != 0)
  i = data.draw(st.integers(0, batch['image/patches'].shape[-1] - 1))
  batch['image/patches'][r, l, i] = data.draw(IN_RANGE)


def _yx_outside_grid(batch, data):
  r, l = _pick(data, batch['image/segment'] != 0)
  c = data.draw(st.integers(0, 1))
  size = batch['image/grid'][r, batch['image/segment'][r, l] - 1, c]
  batch['image/yx'][r, l, c] = data.draw(
      st.one_of(st.integers(-(1 << 31), -1), st.integers(size, (1 << 31) - 1)))


def _yx_inside_grid(batch, data):
  r, l = _pick(data, batch['image/segment'] != 0)
  c = data.draw(st.integers(0, 1))
  size = batch['image/grid'][r, batch['image/segment'][r, l] - 1, c]
  batch['image/yx'][r, l, c] = data.draw(st.integers(0, size - 1))


def _yx_on_padding(batch, data):
  r, l = _pick(data, batch['image/segment'] == 0)
  batch['image/yx'][r, l, data.draw(st.integers(0, 1))] = data.draw(INT32.filter(bool))


def _grid_of_empty_slot(batch, data):
  r, k = _pick(data, ~batch['valid'])
  batch['image/grid'][r, k, data.draw(st.integers(0, 1))] = data.draw(INT32.filter(bool))


def _grid_too_small(batch, data):
  r, k = _pick(data, batch['valid'])
  c = data.draw(st.integers(0, 1))
  batch['image/grid'][r, k, c] = data.draw(
      st.integers(-(1 << 31), _slot_yx_max(batch, r, k, c)))


def _grid_larger(batch, data):
  r, k = _pick(data, batch['valid'])
  c = data.draw(st.integers(0, 1))
  batch['image/grid'][r, k, c] = data.draw(
      st.integers(_slot_yx_max(batch, r, k, c) + 1, (1 << 31) - 1))


def _segment_out_of_range(batch, data):
  slots = batch['valid'].shape[1]
  batch['image/segment'].flat[data.draw(st.integers(
      0, batch['image/segment'].size - 1))] = data.draw(st.one_of(
          st.integers(-(1 << 31), -1), st.integers(slots + 1, (1 << 31) - 1)))


def _flip(key):
  def flip(batch, data):
    batch[key].flat[data.draw(st.integers(0, batch[key].size - 1))] ^= True
  return flip


def _index_of_filled_slot(valid):
  def mutate(batch, data):
    r, k = _pick(data, batch['valid'])
    batch['index'][r, k] = data.draw(
        st.integers(0, 1 << 62) if valid else st.integers(-(1 << 62), -1))
  return mutate


def _index_of_empty_slot(batch, data):
  r, k = _pick(data, ~batch['valid'])
  batch['index'][r, k] = data.draw(st.integers(-(1 << 62), 1 << 62).filter(
      lambda v: v != -1))


def _caption_slot(batch, data):
  g, c = _pick(data, np.ones_like(batch['text/valid']))
  batch['text/slot'][g, c] = data.draw(INT32.filter(
      lambda v: v != batch['text/slot'][g, c]))


def _tokens_of_empty_caption(batch, data):
  g, c = _pick(data, ~batch['text/valid'])
  batch['text/tokens'][g, c, data.draw(st.integers(
      0, batch['text/tokens'].shape[-1] - 1))] = data.draw(INT32.filter(bool))


def _tokens_of_caption(batch, data):
  g, c = _pick(data, batch['text/valid'])
  batch['text/tokens'][g, c, data.draw(st.integers(
      0, batch['text/tokens'].shape[-1] - 1))] = data.draw(INT32)


MUTATIONS = [
    (_drop, False), (_reshape, False), (_retype, False),
    (_pixel_out_of_range, False), (_pixel_on_padding, False), (_pixel_in_range, True),
    (_yx_outside_grid, False), (_yx_inside_grid, True), (_yx_on_padding, False),
    (_grid_of_empty_slot, False), (_grid_too_small, False), (_grid_larger, True),
    (_segment_out_of_range, False), (_flip('valid'), False),
    (_index_of_filled_slot(valid=False), False), (_index_of_filled_slot(valid=True), True),
    (_index_of_empty_slot, False), (_flip('text/valid'), False), (_caption_slot, False),
    (_tokens_of_empty_caption, False), (_tokens_of_caption, True),
]


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_batches(valid_batch, data):
  batch = {k: v.copy() for k, v in valid_batch.items()}
  mutate, stays_valid = data.draw(st.sampled_from(MUTATIONS))
  mutate(batch, data)
  if stays_valid:
    batch_lib.validate_batch(batch, batch_lib.spec_of(valid_batch))
  else:
    with pytest.raises(ValueError, match='.'):
      batch_lib.validate_batch(batch, batch_lib.spec_of(valid_batch))


KEYS = st.one_of(st.sampled_from(['mesh', 'input.patch_sizes', 'model.t_init',
                                  'checkpoint.every', 'optim.schedule', 'input',
                                  'input.resolution.max_tokens', 'seed',
                                  'batch_size', 'optim.lr', 'input.shuffle',
                                  'model.image.posemb_grid']),
                 st.text(max_size=20))
# XLA options: '--name=value' items are well formed; the others are not.
GOOD_OPTION = st.from_regex(r'--[a-z_]{1,12}=[a-z0-9]{0,4}', fullmatch=True)
BAD_OPTION = st.one_of(st.from_regex(r'[a-z_]{1,12}=[a-z0-9]{0,4}', fullmatch=True),
                       st.from_regex(r'--[a-z_]{1,12}', fullmatch=True),
                       st.just('--=1'))


@st.composite
def overrides(draw):
  """(key, text, valid or None): None leaves validity to `_valid_override`."""
  if draw(st.booleans()):
    items = draw(st.lists(st.tuples(st.booleans(), st.data()), max_size=4))
    texts = [data.draw(GOOD_OPTION if good else BAD_OPTION) for good, data in items]
    return 'cpu_compiler_options', ' '.join(texts), all(good for good, _ in items)
  text = draw(st.one_of(st.text(max_size=60), st.integers(-3, 3).map(str)))
  return draw(KEYS), text, None


def _leaf(config, key):
  """(value, declared type) at a dotted key; KeyError when the key is
  unknown or a group."""
  node, parent, leaf = config, None, None
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise KeyError(key)
    node, parent, leaf = node[part], node, part
  if isinstance(node, ml_collections.ConfigDict):
    raise KeyError(key)
  return node, parent.get_type(leaf)


def _valid_override(config, key, text):
  """Whether `--config.key=text` is valid, as the schema documents: a known
  key, text that parses as its type (an unset key takes 'None', and one of
  no declared type any text), a positive batch_size, optim.lr >= 0 and a
  mesh of (axis, size) over 'data' and 'fsdp'."""
  try:
    current, kind = _leaf(config, key)
  except KeyError:
    return False
  if current is None and (text == 'None' or kind is type(None)):
    return True
  parse = {bool: lambda t: t.lower() in ('true', 'false', '1', '0', 'yes', 'no'),
           int: int, float: float, str: str}.get(kind, ast.literal_eval)
  try:
    parsed = parse(text)
  except Exception:  # pylint: disable=broad-except
    return False
  if key == 'optim.lr' and not parsed >= 0:  # NaN too
    return False
  if key == 'mesh' and not _valid_mesh(parsed):
    return False
  return parsed is not False and (key != 'batch_size' or parsed > 0)


def _valid_mesh(mesh):
  """[(axis, size)] over exactly 'data' and 'fsdp', sizes >= 1 or one -1."""
  if not isinstance(mesh, (list, tuple)) or not all(
      isinstance(axis, (list, tuple)) and len(axis) == 2 for axis in mesh):
    return False
  sizes = [size for _, size in mesh]
  return (sorted(name for name, _ in mesh if isinstance(name, str)) == ['data', 'fsdp']
          and all(type(size) is int and (size >= 1 or size == -1) for size in sizes)  # pylint: disable=unidiomatic-typecheck
          and sizes.count(-1) <= 1)


@FUZZ
@given(override=overrides())
@example(override=('mesh', '{[]: 1}', False))  # literal_eval raises TypeError
@example(override=('model.t_init', '', None))  # unset, but typed float
@example(override=('model.image.posemb_grid', 'abc', False))  # unset, typed tuple
def test_arbitrary_config_overrides(override):
  key, text, valid = override
  config = config_lib.load_config_file(TINY)
  if valid is None:
    valid = _valid_override(config, key, text)
  if not valid:
    with pytest.raises(ValueError) as error:
      config_lib.apply_overrides(config, [(key, text)])
      config_lib.check_config(config)
    assert key in str(error.value)
    return
  config_lib.apply_overrides(config, [(key, text)])
  config_lib.check_config(config)
  value, kind = _leaf(config, key)
  if kind in (int, str) and text != 'None':
    assert value == kind(text)
