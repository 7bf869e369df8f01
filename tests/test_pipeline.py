"""The pipeline: contract, keyed determinism, exact restore, eval pass, bad records."""

import dataclasses
import re
import json

import numpy as np
import pytest

from data_fixtures import assert_same_batches, take
from lit_navit.data import batch as batch_lib
from lit_navit.data import decode
from lit_navit.data import dropping
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import resolution
from lit_navit.data import sources
from lit_navit.data import streaming
from lit_navit.data import synthetic
from lit_navit.data import text

TEXT_LEN = 8


@pytest.fixture(scope='module')
def tokenizer():
  return text.Tokenizer(text.default_tokenizer_path(), TEXT_LEN)


def small_config(**overrides):
  """Small images and rows so that each test runs in about a second."""
  config = pipeline_lib.default_config()
  config.tokens_per_row = 64
  config.images_per_row = 6
  config.text_len = TEXT_LEN
  config.patch_sizes = (8,)
  config.resolution.update(min=16, max=64)
  config.pack_buffer = 24
  config.shuffle_buffer = 16
  config.workers = 2
  config.update_from_flattened_dict(overrides)
  return config


def small_source(size=60, seed=0):
  return synthetic.SyntheticSource(size, seed=seed, min_side=16, max_side=80)


class DamagedSource:
  """Wraps a source: some records hold garbage bytes, some are unreadable."""

  def __init__(self, source, garbage=(), unreadable=()):
    self._source = source
    self._garbage, self._unreadable = set(garbage), set(unreadable)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    if index in self._garbage:
      return dataclasses.replace(record, image=b'not an image at all')
    if index in self._unreadable:
      return dataclasses.replace(record, image=b'', error='unreadable: gone')
    return record


def slot_lengths(batch):
  """Tokens per slot, [B, E]."""
  segment = batch['image/segment']
  slots = batch['valid'].shape[1]
  return np.stack([(segment == k + 1).sum(1) for k in range(slots)], axis=1)


@pytest.mark.parametrize('groups,captions_per_row', [(1, None), (3, 2.0)])
def test_train_batches_follow_the_contract(tokenizer, groups, captions_per_row):
  source = small_source()
  config = small_config(captions_per_row=captions_per_row)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=3, seed=0,
                             groups=groups) as pipe:
    batches = take(pipe, 8)
  spec = pipe.batch_spec(8)
  # A group of 3 rows: one caption row per slot; of 1 row: 2 caption rows.
  assert spec.groups == groups
  assert spec.captions == (18 if captions_per_row is None else 2)
  for batch in batches:
    batch_lib.validate_batch(batch, spec, pad_id=tokenizer.pad_id)
    lengths = slot_lengths(batch)
    for r, k in zip(*np.nonzero(batch['valid'])):
      rows, cols = batch['image/grid'][r, k]
      assert lengths[r, k] == rows * cols  # Nothing dropped.
      record = source[batch['index'][r, k]]
      group, row_in_group = divmod(r, spec.rows_per_group)
      caption = batch['text/slot'][group] == row_in_group * spec.slots + k
      caption &= batch['text/valid'][group]
      np.testing.assert_array_equal(batch['text/tokens'][group][caption][0],
                                    tokenizer.encode([record.caption])[0])
      height, width = decode.decode_image(record.image).shape[:2]
      if height >= width:
        assert abs(cols - rows * width / height) < 1  # Aspect kept.
      else:
        assert abs(rows - cols * height / width) < 1
  # 3 rows of 64 tokens hold several 16..64-pixel images at p = 8; with two
  # captions a row, the captions bind: no row holds more than two images and
  # nearly every caption row holds a pair (a row of only large images left
  # in the buffer may hold one).
  images = np.mean([b['valid'].sum() for b in batches])
  if captions_per_row is None:
    assert images > 3
  else:
    assert all(b['valid'].sum(1).max() <= 2 for b in batches)
    assert images > 5.5 and pipe.stats['empty_caption_fraction'] < 0.05


@pytest.mark.parametrize('self_distillation', [False, True])
def test_restore_from_every_state_gives_the_same_batches(tokenizer,
                                                         self_distillation):
  """grain-style: restore from each intermediate state, compare all that
  follows; also with SigLIP 2's local crops and token masks on."""
  source = DamagedSource(small_source(size=40), garbage={3, 17},
                         unreadable={25})
  config = small_config(**{'patch_sizes': (4, 8), 'token_drop.kind': 'beta',
                           'token_drop.rate': 0.3, 'pack_buffer': 16,
                           'captions_per_row': 2.5})
  if self_distillation:
    config.local_crops.update(count=2, max_tokens=4)
    config.mask_ratio = 0.5
  steps = 24
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=5,
                             groups=2) as pipe:
    states, batches = [], []
    for _ in range(steps):
      states.append(json.loads(json.dumps(pipe.get_state())))
      batches.append(next(pipe))
    final_state = pipe.get_state()
  assert final_state['stream']['epoch'] >= 2  # The run wrapped over epochs.
  assert {b['image/patches'].shape[-1] for b in batches} == {4 * 4 * 3, 8 * 8 * 3}
  assert ('image/parent' in batches[0]) == ('image/masked' in batches[0]) == (
      self_distillation)
  for step, state in enumerate(states):
    with pipeline_lib.Pipeline(source, tokenizer, config, rows=2,
                               seed=5, groups=2) as restored:
      restored.set_state(state)
      assert restored.get_state() == state
      assert_same_batches(take(restored, steps - step), batches[step:])
      assert restored.get_state() == final_state


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_batches_do_not_depend_on_the_kind_or_number_of_workers(tokenizer, mode):
  source = small_source()
  config = small_config(**{'token_drop.kind': 'constant',
                           'token_drop.rate': 0.25})
  if mode == 'train':  # FlexiViT: an image at its grid for each patch size.
    config.patch_sizes = (8, 16)
  config.mode = mode
  runs = []
  for threads, processes in ((0, 0), (3, 0), (0, 2)):
    config.workers, config.worker_processes = threads, processes
    with pipeline_lib.Pipeline(source, tokenizer, config, rows=2,
                               seed=1) as pipe:
      runs.append(take(pipe, 6))
  assert_same_batches(runs[0], runs[1])
  assert_same_batches(runs[0], runs[2])


def test_hosts_read_disjoint_shards_at_the_same_patch_sizes(tokenizer):
  source = small_source(size=50)
  config = small_config(patch_sizes=(4, 8, 16))
  seen, patch_dims = [], []
  for host in range(2):
    with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=3,
                               process_index=host, process_count=2) as pipe:
      batches = take(pipe, 12)
    seen.append({int(i) for b in batches for i in b['index'][b['valid']]})
    patch_dims.append([b['image/patches'].shape[-1] for b in batches])
    assert [pipe.patch_size_at(s) ** 2 * 3 for s in range(12)] == patch_dims[-1]
  assert not seen[0] & seen[1]
  assert patch_dims[0] == patch_dims[1]
  assert len(set(patch_dims[0])) > 1


def test_train_repeats_the_shard_in_a_new_order_each_epoch(tokenizer):
  source = small_source(size=20)
  config = small_config(pack_buffer=4)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=1,
                             seed=0) as pipe:
    order = []
    while len(order) < 60:
      batch = next(pipe)
      order.extend(int(i) for i in batch['index'][batch['valid']])
  # A small buffer only moves images a few places: each epoch's 20 images
  # are one shuffled copy of the shard, and the epochs differ.
  seen = np.bincount(order[:60], minlength=20)
  assert seen.min() >= 2 and seen.max() <= 4
  assert order[:20] != order[20:40]


def test_eval_reads_every_image_once_fitted_to_the_budget(tokenizer):
  source = DamagedSource(small_source(size=37), garbage={5}, unreadable={30})
  config = small_config(**{'mode': 'eval', 'resolution.max_tokens': 24,
                           'shuffle': True})
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2,
                             seed=0) as pipe:
    batches = []
    for batch in pipe:
      batches.append(batch)
      # Read in source order (no shuffle in eval): pending stays ascending.
      pending = [index for index, _ in pipe.get_state()['pending']]
      assert pending == sorted(pending)
    with pytest.raises(StopIteration):
      next(pipe)
  found = [int(i) for b in batches for i in b['index'][b['valid']]]
  assert sorted(found) == [i for i in range(37) if i not in (5, 30)]
  assert pipe.skipped.counts == {'not_image': 1, 'unreadable': 1}
  assert not batches[-1]['valid'].all()  # The last batch is padded.
  for batch in batches:
    batch_lib.validate_batch(batch, pad_id=tokenizer.pad_id)
    lengths = slot_lengths(batch)
    for r, k in zip(*np.nonzero(batch['valid'])):
      height, width = decode.decode_image(
          source[batch['index'][r, k]].image).shape[:2]
      grid = resolution.grid_for_budget(height, width, 24)
      assert tuple(batch['image/grid'][r, k]) == grid
      assert lengths[r, k] == grid[0] * grid[1]


def test_eval_native_keeps_small_images_small_and_packs_them(tokenizer):
  source = small_source(size=20)
  config = small_config(**{'mode': 'eval', 'resolution.mode': 'native',
                           'resolution.max_tokens': 24})
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2,
                             seed=0) as pipe:
    batches = list(pipe)
  found = [int(i) for b in batches for i in b['index'][b['valid']]]
  assert sorted(found) == list(range(20))
  below_fit = 0
  for batch in batches:
    batch_lib.validate_batch(batch, pad_id=tokenizer.pad_id)
    for r, k in zip(*np.nonzero(batch['valid'])):
      height, width = decode.decode_image(
          source[batch['index'][r, k]].image).shape[:2]
      grid = tuple(batch['image/grid'][r, k])
      assert grid == resolution.grid_for_native(height, width, 8, 24)
      below_fit += grid != resolution.grid_for_budget(height, width, 24)
  # Some images are smaller than the budget, so a row of 64 tokens holds
  # more than the two that 'fit' would give it.
  assert below_fit > 0
  assert pipe.stats['images_per_row'] > 2


def test_eval_over_hosts_covers_the_source_once(tokenizer):
  source = small_source(size=23)
  config = small_config(mode='eval')
  found = []
  for host in range(3):
    with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=0,
                               process_index=host, process_count=3) as pipe:
      found += [int(i) for b in pipe for i in b['index'][b['valid']]]
  assert sorted(found) == list(range(23))


def test_token_dropping_in_the_pipeline(tokenizer):
  config = small_config(**{'token_drop.kind': 'constant',
                           'token_drop.rate': 0.5})
  with pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=2,
                             seed=0) as pipe:
    batches = take(pipe, 5)
  for batch in batches:
    batch_lib.validate_batch(batch, pad_id=tokenizer.pad_id)
    lengths = slot_lengths(batch)
    for r, k in zip(*np.nonzero(batch['valid'])):
      rows, cols = batch['image/grid'][r, k]
      assert lengths[r, k] == dropping.kept_count(rows * cols, 0.5)
      yx = batch['image/yx'][r][batch['image/segment'][r] == k + 1]
      assert np.all(np.diff(yx[:, 0] * cols + yx[:, 1]) > 0)


def test_bad_records_are_skipped_and_counted(tokenizer):
  garbage, unreadable = {1, 8, 9}, {4}
  source = DamagedSource(small_source(size=30), garbage, unreadable)
  with pipeline_lib.Pipeline(source, tokenizer, small_config(), rows=2,
                             seed=0) as pipe:
    batches = take(pipe, 10)
  found = {int(i) for b in batches for i in b['index'][b['valid']]}
  assert not found & (garbage | unreadable)
  counts = pipe.skipped.counts
  # More than one epoch was read: each bad record was met at least once.
  assert set(counts) == {'not_image', 'unreadable'}
  assert counts['not_image'] >= 3 and counts['unreadable'] >= 1
  assert pipe.get_state()['skipped'] == counts


def test_a_broken_source_stops_loudly(tokenizer):
  source = DamagedSource(small_source(size=40), garbage=range(0, 40, 2))
  config = small_config(bad_record_window=20, bad_record_budget=0.1)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2,
                             seed=0) as pipe:
    with pytest.raises(streaming.BrokenSource, match='broken') as error:
      take(pipe, 10)
  assert re.search(r'the last failure was \S+ \(not_image\)', str(error.value)), error.value


def test_the_budget_names_the_last_failure_not_the_record_that_tripped_it(tokenizer):
  source = small_source(size=40)
  config = small_config(bad_record_window=20, bad_record_budget=0.1)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=0) as pipe:
    for i in range(19):
      pipe._account_record(source[i], 'not_image')  # pylint: disable=protected-access
    # The window fills on a good record.
    with pytest.raises(streaming.BrokenSource, match='broken') as error:
      pipe._account_record(source[19], None)  # pylint: disable=protected-access
  assert str(error.value).endswith(f'the last failure was {source[18].key} (not_image).')


def test_stats_track_padding_and_images_per_row(tokenizer):
  with pipeline_lib.Pipeline(small_source(), tokenizer, small_config(),
                             rows=3, seed=0) as pipe:
    batches = take(pipe, 6)
    stats = pipe.stats
  tokens = sum(np.count_nonzero(b['image/segment']) for b in batches)
  images = sum(int(b['valid'].sum()) for b in batches)
  assert stats['batches'] == 6 and stats['images'] == images
  assert stats['padding_fraction'] == pytest.approx(1 - tokens / (6 * 3 * 64))
  assert stats['images_per_row'] == pytest.approx(images / 18)


def test_captions_are_sized_per_group_and_checked_on_restore(tokenizer):
  config = small_config(captions_per_row=1.5)
  spec = pipeline_lib.batch_spec(config, rows=8, groups=2, patch_size=8)
  assert (spec.groups, spec.captions) == (2, 6)  # ceil(1.5 * 4 rows).
  with pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=4,
                             seed=0, groups=2) as pipe:
    take(pipe, 2)
    state = pipe.get_state()
  with pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=4,
                             seed=0, groups=4) as other:
    with pytest.raises(ValueError, match='groups'):
      other.set_state(state)
  with pytest.raises(ValueError, match='caption groups'):
    pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=3, seed=0,
                          groups=2)


def test_state_is_small_and_rejects_another_run(tokenizer):
  config = small_config()
  with pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=2,
                             seed=0) as pipe:
    take(pipe, 3)
    state = pipe.get_state()
  encoded = json.dumps(state)
  assert len(encoded) < 2000
  assert len(state['pending']) <= config.pack_buffer
  with pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=2,
                             seed=1) as other:
    with pytest.raises(ValueError, match='seed'):
      other.set_state(state)


def test_default_config_builds_a_pipeline(tokenizer):
  config = pipeline_lib.default_config()
  assert set(config.keys()) >= {
      'mode', 'source', 'tokenizer', 'tokens_per_row', 'images_per_row',
      'text_len', 'patch_sizes', 'resolution', 'token_drop', 'pack_buffer',
      'shuffle', 'max_pixels', 'workers', 'bad_record_budget',
      'bad_record_window'}
  config.text_len = TEXT_LEN
  config.pack_buffer = 8  # Few decodes: the defaults otherwise hold.
  source = sources.make_source(config.source)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=1,
                             seed=0) as pipe:
    batch = next(pipe)
  batch_lib.validate_batch(batch, pipe.batch_spec(16), pad_id=tokenizer.pad_id)


@pytest.mark.parametrize('key,value', [
    ('mode', 'test'),
    ('patch_sizes', ()),
    ('resolution.mode', 'crop'),
    ('resolution.dist', 'gamma'),
    ('resolution.max_tokens', 65),
    ('token_drop.kind', 'random'),
    ('pack_buffer', 0),
    ('bad_record_budget', 1.0),
    ('captions_per_row', 0.0),
])
def test_bad_config_values_name_their_key(tokenizer, key, value):
  config = small_config(**{key: value})
  with pytest.raises(ValueError, match=f'input.{key}'):
    pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=1, seed=0)


def test_eval_needs_one_patch_size(tokenizer):
  config = small_config(mode='eval', patch_sizes=(8, 16))
  with pytest.raises(ValueError, match='input.patch_sizes'):
    pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=1, seed=0)
