"""Local crops (image/parent) and token masks (image/masked) in the pipeline:
crops are cut from the source image at their keyed boxes and packed after
their parent with no caption; masks cover exactly their count of each global
image's tokens, keyed; the validator rejects breaches; resume is exact; off
changes nothing."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_fixtures import assert_same_batches, take
from lit_navit.data import batch as batch_lib
from lit_navit.data import crops as crops_lib
from lit_navit.data import decode
from lit_navit.data import masking
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import resolution
from lit_navit.data import synthetic
from lit_navit.data import text

TEXT_LEN = 8
COUNT = 2
CROP_TOKENS = 4
MASK_RATIO = 0.5


@pytest.fixture(scope='module')
def tokenizer():
  return text.Tokenizer(text.default_tokenizer_path(), TEXT_LEN)


def crops_config(count=COUNT, mask_ratio=MASK_RATIO, **overrides):
  """Small rows and images; `count` crops of <= 4 tokens; masks at `mask_ratio`."""
  config = pipeline_lib.default_config()
  config.update(tokens_per_row=64, images_per_row=8, text_len=TEXT_LEN,
                patch_sizes=(8,), pack_buffer=16, shuffle_buffer=16, workers=2,
                mask_ratio=mask_ratio)
  config.resolution.update(min=16, max=48)
  config.local_crops.update(count=count, max_tokens=CROP_TOKENS)
  config.update_from_flattened_dict(overrides)
  return config


def small_source(size=40):
  return synthetic.SyntheticSource(size, seed=0, min_side=16, max_side=80)


def run(tokenizer, config, steps, source=None, rows=2, seed=0, groups=1):
  with pipeline_lib.Pipeline(source or small_source(), tokenizer, config,
                             rows=rows, seed=seed, groups=groups) as pipe:
    return take(pipe, steps), pipe.batch_spec(config.patch_sizes[0])


def slot_tokens(batch, r, k):
  """The token positions of slot k (0-based) of row r."""
  return np.flatnonzero(batch['image/segment'][r] == k + 1)


def test_each_crop_is_its_keyed_box_cut_from_the_source_and_resized_alone(tokenizer):
  source = small_source()
  config = crops_config(mask_ratio=0.0, patch_dtype='uint8')
  # 3 batches of 2 rows take fewer than the 40 images of epoch 0.
  batches, spec = run(tokenizer, config, 3, source)
  crop_config = crops_lib.from_config(config.local_crops)
  checked = 0
  for batch in batches:
    batch_lib.validate_batch(batch, spec, pad_id=tokenizer.pad_id)
    for r, k in zip(*np.nonzero(batch['image/parent'])):
      parent = batch['image/parent'][r, k] - 1
      index = int(batch['index'][r, k])
      image = decode.decode_image(source[index].image)
      boxes = crops_lib.crop_boxes(crop_config, seed=0, index=index, epoch=0,
                                   height=image.shape[0], width=image.shape[1])
      top, left, height, width = boxes[k - parent - 1]
      grid = resolution.grid_for_budget(height, width, CROP_TOKENS)
      expected = patches_lib.patchify(
          patches_lib.resize_image(image[top:top + height, left:left + width],
                                   (grid[0] * 8, grid[1] * 8)), 8, 'uint8')
      tokens = slot_tokens(batch, r, k)
      assert tuple(batch['image/grid'][r, k]) == grid
      np.testing.assert_array_equal(batch['image/patches'][r, tokens],
                                    expected.pixels)
      np.testing.assert_array_equal(batch['image/yx'][r, tokens], expected.yx)
      checked += 1
  assert checked >= 10


def test_parents_and_crops_share_a_row_and_only_parents_have_captions(tokenizer):
  source = small_source()
  config = crops_config(captions_per_row=2.0)
  batches, spec = run(tokenizer, config, 4, source, rows=4, groups=2)
  assert spec.local_crops and spec.masks
  for batch in batches:
    batch_lib.validate_batch(batch, spec, pad_id=tokenizer.pad_id)
    parent, valid = batch['image/parent'], batch['valid']
    is_global = valid & (parent == 0)
    for r in range(spec.rows):
      for k in np.flatnonzero(is_global[r]):
        # Its crops take exactly the slots right after it, and name it.
        crops = np.flatnonzero(parent[r] == k + 1)
        assert crops.tolist() == list(range(k + 1, k + 1 + COUNT))
        assert np.all(batch['index'][r, crops] == batch['index'][r, k])
        assert np.all(batch['image/grid'][r, crops].prod(-1) <= CROP_TOKENS)
    assert valid.sum() == (1 + COUNT) * is_global.sum()
    # Each group's captions: exactly its global images, each with its own.
    for g in range(spec.groups):
      n = int(batch['text/valid'][g].sum())
      rows_of_group = slice(g * spec.rows_per_group, (g + 1) * spec.rows_per_group)
      assert n == is_global[rows_of_group].sum()
      for c in range(n):
        row_in_group, k = divmod(int(batch['text/slot'][g, c]), spec.slots)
        r = g * spec.rows_per_group + row_in_group
        assert is_global[r, k]
        caption = source[int(batch['index'][r, k])].caption
        np.testing.assert_array_equal(batch['text/tokens'][g, c],
                                      tokenizer.encode([caption])[0])


def test_masks_cover_exactly_their_count_of_each_global_image(tokenizer):
  # Token dropping on: the mask is drawn over the tokens an image keeps.
  config = crops_config(**{'token_drop.kind': 'constant', 'token_drop.rate': 0.25,
                           'patch_sizes': (4, 8)})
  # At most 2 images a row (3 slots each): 6 batches stay in epoch 0.
  batches, spec = run(tokenizer, config, 6, small_source(size=80), rows=3)
  masked_images = 0
  for batch in batches:
    batch_lib.validate_batch(batch, pad_id=tokenizer.pad_id)
    masked, parent = batch['image/masked'], batch['image/parent']
    assert not masked[batch['image/segment'] == 0].any()
    for r, k in zip(*np.nonzero(batch['valid'])):
      tokens = slot_tokens(batch, r, k)
      if parent[r, k]:
        assert not masked[r, tokens].any()
        continue
      expected = masking.token_mask(tokens.size, MASK_RATIO, seed=0,
                                    index=int(batch['index'][r, k]), epoch=0)
      np.testing.assert_array_equal(masked[r, tokens], expected)
      assert masked[r, tokens].sum() == masking.masked_count(tokens.size,
                                                             MASK_RATIO)
      masked_images += tokens.size > 1
  assert masked_images >= 10


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 80), st.floats(0.01, 0.99), st.integers(0, 10**6))
def test_token_mask_count_and_keying(num_tokens, ratio, index):
  mask = masking.token_mask(num_tokens, ratio, seed=3, index=index, epoch=0)
  count = masking.masked_count(num_tokens, ratio)
  assert mask.shape == (num_tokens,) and mask.sum() == count
  if num_tokens > 1:
    assert 1 <= count <= num_tokens - 1
    assert count == min(max(1, math.floor(ratio * num_tokens + 0.5)),
                        num_tokens - 1)
  np.testing.assert_array_equal(
      mask, masking.token_mask(num_tokens, ratio, seed=3, index=index, epoch=0))
  if count and count < num_tokens and math.comb(num_tokens, count) >= 6:
    # Other epochs, other images: other masks (not all ten the same).
    epochs = {masking.token_mask(num_tokens, ratio, seed=3, index=index,
                                 epoch=e).tobytes() for e in range(1, 11)}
    images = {masking.token_mask(num_tokens, ratio, seed=3, index=index + i,
                                 epoch=0).tobytes() for i in range(1, 11)}
    assert len(epochs) > 1 and len(images) > 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.floats(0.01, 1.0),
       st.floats(0.01, 1.0), st.integers(0, 10**6))
def test_crop_boxes_lie_in_the_image_at_their_scale_and_aspect(
    height, width, scale_a, scale_b, index):
  config = crops_lib.CropConfig(count=3, min_scale=min(scale_a, scale_b),
                                max_scale=max(scale_a, scale_b), max_tokens=16)
  boxes = crops_lib.crop_boxes(config, seed=1, index=index, epoch=2,
                               height=height, width=width)
  assert boxes == crops_lib.crop_boxes(config, seed=1, index=index, epoch=2,
                                       height=height, width=width)
  for top, left, box_height, box_width in boxes:
    assert 0 <= top and top + box_height <= height
    assert 0 <= left and left + box_width <= width
    clamped = box_height in (1, height) or box_width in (1, width)
    if not clamped and min(box_height, box_width) >= 20:
      # Whole pixels: scale and aspect within rounding of their ranges.
      fraction = box_height * box_width / (height * width)
      assert config.min_scale * 0.9 <= fraction <= config.max_scale * 1.1
      assert 0.75 * 0.9 <= box_width / box_height <= 4 / 3 * 1.1


def test_crops_differ_across_crops_epochs_and_images():
  config = crops_lib.CropConfig(count=4, min_scale=0.05, max_scale=0.4,
                                max_tokens=16)
  def boxes(index, epoch):
    return crops_lib.crop_boxes(config, seed=0, index=index, epoch=epoch,
                                height=200, width=300)
  assert len(set(boxes(0, 0))) == 4
  assert boxes(0, 0) != boxes(0, 1) and boxes(0, 0) != boxes(1, 0)


def test_plan_keeps_a_unit_in_one_row_within_its_slots():
  # Units of 3 slots in rows of 4 slots: one unit a row, whatever the tokens.
  plan = packing.plan_rows([2, 2, 2], rows=2, tokens_per_row=16, slots=4)
  assert sum(map(len, plan)) == 3
  plan = packing.plan([2, 2, 2], rows=2, tokens_per_row=16, slots=4,
                      unit_slots=[3, 3, 3]).rows
  assert plan == [[0], [1]]
  with pytest.raises(ValueError, match='slots per image'):
    packing.plan([2], rows=1, tokens_per_row=16, slots=2, unit_slots=[3])


def _tiny_batch():
  """One row: an image of 4 tokens with 2 crops, an image of 2 with none;
  8 tokens, 5 slots (the last empty), masks on."""
  def patches(n):
    return patches_lib.Patches(np.zeros((n, 3), np.float32),
                               np.stack([np.zeros(n), np.arange(n)], 1).astype(np.int32),
                               (1, n))
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=9, slots=5, text_len=2,
                             patch_size=1, local_crops=True, masks=True)
  images = [packing.PackedImage(patches(4), np.array([5, 6], np.int32), 7,
                                crops=(patches(1), patches(1)),
                                masked=np.array([1, 0, 1, 0], np.bool_)),
            packing.PackedImage(patches(2), np.array([8, 0], np.int32), 9,
                                masked=np.array([0, 1], np.bool_))]
  batch = packing.pack_batch([images], spec, pad_id=0)
  batch_lib.validate_batch(batch, spec)
  return batch


def test_pack_batch_writes_crops_after_their_parent():
  batch = _tiny_batch()
  assert batch['image/parent'].tolist() == [[0, 1, 1, 0, 0]]
  assert batch['image/segment'].tolist() == [[1, 1, 1, 1, 2, 3, 4, 4, 0]]
  assert batch['index'].tolist() == [[7, 7, 7, 9, -1]]
  assert batch['image/masked'].tolist() == [[1, 0, 1, 0, 0, 0, 0, 1, 0]]
  assert batch['text/slot'].tolist() == [[0, 3, 0, 0, 0]]
  assert batch['text/valid'].tolist() == [[True, True, False, False, False]]


def test_pack_batch_refuses_crops_and_masks_the_batch_cannot_hold():
  patches = patches_lib.patchify(np.zeros((1, 2, 3), np.uint8), 1)
  caption = np.zeros(2, np.int32)
  with_crops = packing.PackedImage(patches, caption, 0, crops=(patches,))
  with_mask = packing.PackedImage(patches, caption, 0,
                                  masked=np.array([True, False]))
  plain = batch_lib.BatchSpec(rows=1, tokens_per_row=8, slots=3, text_len=2,
                              patch_size=1)
  with pytest.raises(ValueError, match='no image/parent'):
    packing.pack_batch([[with_crops]], plain, 0)
  with pytest.raises(ValueError, match='no image/masked'):
    packing.pack_batch([[with_mask]], plain, 0)
  crops = batch_lib.BatchSpec(rows=1, tokens_per_row=8, slots=3, text_len=2,
                              patch_size=1, local_crops=True)
  with pytest.raises(ValueError, match='3 slots'):  # 2 + 2 slots.
    packing.pack_batch([[with_crops, with_crops]], crops, 0)


def parent_outside_the_row(batch):
  batch['image/parent'][0, 1] = 6


def parent_an_empty_slot(batch):
  batch['image/parent'][0, 2] = 5


def parent_a_later_slot(batch):
  batch['image/parent'][0, 1] = 4


def parent_a_crop(batch):
  batch['image/parent'][0, 2] = 2


def parent_on_an_empty_slot(batch):
  batch['image/parent'][0, 4] = 1


def mask_on_padding(batch):
  batch['image/masked'][0, 8] = True


def mask_on_a_crop(batch):
  batch['image/masked'][0, 5] = True


def caption_of_a_crop(batch):
  batch['text/slot'][0, 1] = 1


@pytest.mark.parametrize('breach,message', [
    (parent_outside_the_row, 'not a filled slot of its row'),
    (parent_an_empty_slot, 'not a filled slot of its row'),
    (parent_a_later_slot, 'not a filled slot of its row'),
    (parent_a_crop, 'is a crop'),
    (parent_on_an_empty_slot, 'empty slot has a parent'),
    (mask_on_padding, 'padding token is masked'),
    (mask_on_a_crop, "crop's token is masked"),
    (caption_of_a_crop, 'not its filled slots'),
])
def test_validator_names_each_crop_and_mask_breach(breach, message):
  batch = _tiny_batch()
  breach(batch)
  with pytest.raises(ValueError, match=message):
    batch_lib.validate_batch(batch)


def test_workers_threads_and_processes_make_the_same_crops(tokenizer):
  runs = []
  for threads, processes in ((0, 0), (0, 2)):
    config = crops_config(workers=threads, worker_processes=processes)
    runs.append(run(tokenizer, config, 2)[0])
  assert_same_batches(runs[0], runs[1])


def test_off_adds_no_key_and_masks_change_nothing_else(tokenizer):
  off, off_spec = run(tokenizer, crops_config(count=0, mask_ratio=0.0), 4)
  assert not off_spec.local_crops and not off_spec.masks
  assert all(set(b) == set(off_spec.shapes()) for b in off)
  assert not {'image/parent', 'image/masked'} & set(off[0])
  masked, _ = run(tokenizer, crops_config(count=0), 4)
  assert_same_batches([{k: v for k, v in b.items() if k != 'image/masked'}
                       for b in masked], off)
  assert any(b['image/masked'].any() for b in masked)


def test_eval_mode_makes_no_crops_and_no_masks(tokenizer):
  batches = {}
  for count, ratio in ((0, 0.0), (COUNT, MASK_RATIO)):
    config = crops_config(count=count, mask_ratio=ratio, mode='eval',
                          **{'resolution.mode': 'fit', 'resolution.max_tokens': 16})
    batches[count] = run(tokenizer, config, 3)[0]
  assert_same_batches(batches[0], batches[COUNT])


@pytest.mark.parametrize('key,value', [
    ('local_crops.count', -1),
    ('local_crops.min_scale', 0.0),
    ('local_crops.max_scale', 1.5),
    ('local_crops.min_scale', 0.5),  # Above max_scale (0.4).
    ('local_crops.max_tokens', 0),
    ('local_crops.max_tokens', 32),  # 2 crops of 32 fill the row of 64.
    ('local_crops.count', 8),  # 9 slots for a unit in rows of 8.
    ('resolution.max_tokens', 60),  # With 8 tokens of crops: over 64.
    ('mask_ratio', 1.0),
    ('mask_ratio', -0.1),
])
def test_bad_crop_and_mask_values_name_their_key(tokenizer, key, value):
  config = crops_config(**{key: value})
  with pytest.raises(ValueError, match=f'input.{key}'):
    pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=1, seed=0)
