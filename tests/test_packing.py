"""The packer: every image in exactly one slot, rows within L and E, contract held."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_navit.data import batch as batch_lib
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib

PAD_ID = 3


@st.composite
def plans(draw):
  tokens_per_row = draw(st.integers(1, 64))
  sizes = draw(st.lists(st.integers(1, tokens_per_row), max_size=60))
  groups = draw(st.integers(1, 3))
  rows = groups * draw(st.integers(1, 3))
  captions = draw(st.none() | st.integers(1, 12))
  slots = draw(st.integers(1, 5))
  # Local crops: an image and its crops take several slots (None: one).
  unit_slots = draw(st.none() | st.lists(st.integers(1, slots),
                                         min_size=len(sizes),
                                         max_size=len(sizes)))
  return sizes, rows, tokens_per_row, slots, groups, captions, unit_slots


@settings(max_examples=300, deadline=None)
@given(plans())
def test_plan_respects_rows_tokens_slots_and_captions(case):
  sizes, rows, tokens_per_row, slots, groups, captions, unit_slots = case
  plan = packing.plan(sizes, rows, tokens_per_row, slots, groups=groups,
                      captions=captions, unit_slots=unit_slots).rows
  needs = unit_slots or [1] * len(sizes)
  assert len(plan) == rows
  placed = [position for row in plan for position in row]
  assert len(placed) == len(set(placed))  # At most one row per image.
  for row in plan:
    assert row == sorted(row)  # Slots follow the buffer's order.
    assert sum(needs[p] for p in row) <= slots
    assert sum(sizes[p] for p in row) <= tokens_per_row
  group_rows = rows // groups
  used = [sum(len(row) for row in plan[g * group_rows:(g + 1) * group_rows])
          for g in range(groups)]
  if captions is not None:
    assert max(used) <= captions  # A caption row for every image placed.
  if sizes:
    assert 0 in placed  # The oldest image is never passed over.
  # An image left out fits in no row with a caption row left in its group.
  room = [tokens_per_row - sum(sizes[p] for p in row) for row in plan]
  for position in set(range(len(sizes))) - set(placed):
    assert not any(r >= sizes[position]
                   and sum(needs[p] for p in row) + needs[position] <= slots
                   and (captions is None or used[i // group_rows] < captions)
                   for i, (r, row) in enumerate(zip(room, plan)))


def test_plan_stops_when_a_groups_captions_run_out():
  # Two groups of one row; group 0 has room for tokens but only 2 captions.
  plan = packing.plan_rows([1] * 6, rows=2, tokens_per_row=8, slots=8,
                           groups=2, captions=2)
  assert [len(row) for row in plan] == [2, 2]


def test_plan_rejects_images_longer_than_a_row():
  with pytest.raises(ValueError, match='token counts'):
    packing.plan_rows([5, 9], rows=2, tokens_per_row=8, slots=4)


@st.composite
def packed_rows(draw):
  p = draw(st.sampled_from([1, 2]))
  tokens_per_row, slots = draw(st.integers(1, 24)), draw(st.integers(1, 4))
  groups = draw(st.integers(1, 3))
  spec = batch_lib.BatchSpec(rows=groups * draw(st.integers(1, 2)),
                             tokens_per_row=tokens_per_row, slots=slots,
                             text_len=draw(st.integers(1, 5)), patch_size=p,
                             groups=groups,
                             captions_per_group=draw(st.none() | st.integers(1, 6)))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  rows, index = [], 0
  captions_left = [spec.captions] * groups
  for r in range(draw(st.integers(0, spec.rows))):
    row, room = [], tokens_per_row
    group = r // spec.rows_per_group
    while (len(row) < slots and room > 0 and captions_left[group]
           and draw(st.booleans())):
      rows_, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
      image = rng.integers(0, 256, (rows_ * p, cols * p, 3), dtype=np.uint8)
      patches = patches_lib.patchify(image, p)
      keep = draw(st.integers(1, min(room, len(patches))))
      chosen = np.sort(rng.choice(len(patches), keep, replace=False))
      patches = patches_lib.Patches(patches.pixels[chosen], patches.yx[chosen],
                                    patches.grid)
      caption = rng.integers(0, 1000, spec.text_len).astype(np.int32)
      row.append(packing.PackedImage(patches, caption, index))
      index += 1
      room -= keep
      captions_left[group] -= 1
    rows.append(row)
  return rows, spec


@settings(max_examples=200, deadline=None)
@given(packed_rows())
def test_packed_batch_holds_each_image_and_its_caption(case):
  rows, spec = case
  batch = packing.pack_batch(rows, spec, PAD_ID)
  batch_lib.validate_batch(batch, spec, pad_id=PAD_ID)
  images = {image.index: image for row in rows for image in row}
  found = batch['index'][batch['valid']]
  assert sorted(found.tolist()) == sorted(images)  # Each exactly once.
  assert batch['text/valid'].sum() == len(images)  # One caption row each.
  for r, k in zip(*np.nonzero(batch['valid'])):
    image = images[batch['index'][r, k]]
    group, row_in_group = divmod(r, spec.rows_per_group)
    caption_row = np.flatnonzero(
        batch['text/valid'][group]
        & (batch['text/slot'][group] == row_in_group * spec.slots + k))
    assert caption_row.size == 1
    np.testing.assert_array_equal(batch['text/tokens'][group, caption_row[0]],
                                  image.tokens)
    assert tuple(batch['image/grid'][r, k]) == image.patches.grid
    tokens = batch['image/segment'][r] == k + 1
    np.testing.assert_array_equal(batch['image/patches'][r, tokens],
                                  image.patches.pixels)
    np.testing.assert_array_equal(batch['image/yx'][r, tokens], image.patches.yx)


def test_pack_batch_rejects_overfull_rows():
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=4, slots=1, text_len=2,
                             patch_size=1)
  patches = patches_lib.patchify(np.zeros((1, 3, 3), np.uint8), 1)
  image = packing.PackedImage(patches, np.zeros(2, np.int32), 0)
  with pytest.raises(ValueError, match='slots'):
    packing.pack_batch([[image, image]], spec, 0)
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=4, slots=2, text_len=2,
                             patch_size=1)
  with pytest.raises(ValueError, match='tokens'):
    packing.pack_batch([[image, image]], spec, 0)
  with pytest.raises(ValueError, match='rows'):
    packing.pack_batch([[image], [image]], spec, 0)
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=4, slots=2, text_len=2,
                             patch_size=1, captions_per_group=1)
  small = packing.PackedImage(
      patches_lib.patchify(np.zeros((1, 1, 3), np.uint8), 1),
      np.zeros(2, np.int32), 0)
  with pytest.raises(ValueError, match='caption rows'):
    packing.pack_batch([[small, small]], spec, 0)


def test_plan_is_best_fit():
  # The 2 goes where it leaves no room (row 1), not to the first row with room.
  assert packing.plan_rows([3, 6, 2], rows=2, tokens_per_row=8,
                           slots=4) == [[0], [1, 2]]
