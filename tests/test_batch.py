"""The batch contract's validator accepts packed batches and names each breach."""

import numpy as np
import pytest

from lit_navit.data import batch as batch_lib
from tests.model_batches import pack, random_image

PAD_ID = 3


def two_groups():
  """Two groups of one row each, three caption rows per group."""
  rng = np.random.default_rng(0)
  images = [[random_image(rng, 1, 2, 1), random_image(rng, 2, 1, 1)],
            [random_image(rng, 1, 1, 1)]]
  return pack(images, tokens_per_row=5, slots=3, text_len=2, pad_id=PAD_ID,
              captions=[[[5], [6]], [[7]]], groups=2, captions_per_group=3)


def test_packed_batch_is_valid_and_pairs_captions_in_slot_order():
  batch = two_groups()
  batch_lib.validate_batch(batch, pad_id=PAD_ID)
  assert batch['text/valid'].tolist() == [[True, True, False], [True, False, False]]
  assert batch['text/slot'].tolist() == [[0, 1, 0], [0, 0, 0]]
  assert batch['text/tokens'][:, :, 0].tolist() == [[5, 6, PAD_ID], [7, PAD_ID, PAD_ID]]
  assert batch_lib.spec_of(batch).captions == 3


def swap_slots(batch):
  batch['text/slot'][0, :2] = [1, 0]


def extra_pair(batch):
  batch['text/valid'][1, 1] = True


def tokens_in_empty_row(batch):
  batch['text/tokens'][0, 2, 0] = 9


def slot_in_empty_row(batch):
  batch['text/slot'][1, 2] = 1


def image_without_caption(batch):
  batch['text/valid'][0, 1] = False
  batch['text/slot'][0, 1] = 0
  batch['text/tokens'][0, 1] = PAD_ID


@pytest.mark.parametrize('breach,message', [
    (swap_slots, 'not its filled slots in order'),
    (extra_pair, 'text/valid must mark exactly'),
    (tokens_in_empty_row, 'empty caption row'),
    (slot_in_empty_row, 'empty caption row'),
    (image_without_caption, 'text/valid must mark exactly'),
])
def test_validator_names_each_caption_breach(breach, message):
  batch = two_groups()
  breach(batch)
  with pytest.raises(ValueError, match=message):
    batch_lib.validate_batch(batch, pad_id=PAD_ID)


def test_more_images_than_caption_rows_is_rejected():
  rng = np.random.default_rng(1)
  images = [[random_image(rng, 1, 1, 1) for _ in range(3)]]
  batch = pack(images, tokens_per_row=4, slots=3, captions_per_group=3)
  for key in ('text/tokens', 'text/slot', 'text/valid'):
    batch[key] = batch[key][:, :2]  # Two caption rows for three images.
  with pytest.raises(ValueError, match='exceed its 2 caption rows'):
    batch_lib.validate_batch(batch)


def test_spec_rejects_rows_that_do_not_split_into_groups():
  with pytest.raises(ValueError, match='caption groups'):
    batch_lib.BatchSpec(rows=3, tokens_per_row=4, slots=2, text_len=1,
                        patch_size=1, groups=2)
