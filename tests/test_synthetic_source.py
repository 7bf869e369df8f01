"""SyntheticSource: a pure function of (seed, split, index), held-out pairs
kept out of 'train', sizes within bounds, captions naming what is drawn."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_navit.data import sources
from lit_navit.data import synthetic
from lit_navit.data.decode import decode_image
from lit_navit.data.synthetic import COLOURS, HELD_OUT, SHAPES, SyntheticSource

SMALL = dict(min_side=16, max_side=48)  # Keeps rendering cheap.


def pairs_of(source, n):
  return [(a['shape'], a['colour'])
          for a in (source.attributes(i) for i in range(n))]


def test_deterministic_in_seed_split_and_index():
  """Two sources with the same (seed, split) give identical bytes and
  captions for every index, in any reading order; another seed or split
  gives different images."""
  a = SyntheticSource(size=20, seed=3, **SMALL)
  b = SyntheticSource(size=20, seed=3, **SMALL)
  forward = [a[i] for i in range(20)]
  backward = [b[i] for i in reversed(range(20))][::-1]
  assert forward == backward
  assert [r.index for r in forward] == list(range(20))
  assert forward[7].key == 'synthetic/train/7'
  other_seed = SyntheticSource(size=20, seed=4, **SMALL)
  other_split = SyntheticSource(size=20, seed=3, split='all', **SMALL)
  for other in (other_seed, other_split):
    differing = sum(other[i].image != forward[i].image for i in range(20))
    assert differing == 20
  # Distinct indices are distinct images too.
  assert len({r.image for r in forward}) == 20


def test_attributes_match_the_rendered_example():
  """attributes(i) describes record i: same caption, and the decoded image
  is width x height with the object's colour at its centre (PNG, lossless;
  rings are hollow so their centre is background)."""
  source = SyntheticSource(size=40, seed=1, image_format='png', **SMALL)
  checked = 0
  for i in range(40):
    attributes, record = source.attributes(i), source[i]
    assert record.caption == attributes['caption']
    pixels = decode_image(record.image)
    assert pixels.shape == (attributes['height'], attributes['width'], 3)
    if attributes['shape'] != 'ring':
      cx, cy = attributes['centre']
      np.testing.assert_array_equal(pixels[int(cy), int(cx)], attributes['rgb'])
      checked += 1
  assert checked >= 20


def test_object_scale_shrinks_only_the_object():
  """object_scale multiplies the object's radius; the caption, image size
  and everything else drawn stay the same, and the object stays inside."""
  full = SyntheticSource(size=30, seed=2, **SMALL)
  small = SyntheticSource(size=30, seed=2, object_scale=0.4, **SMALL)
  for i in range(30):
    a, b = full.attributes(i), small.attributes(i)
    assert b['radius'] == pytest.approx(0.4 * a['radius'])
    assert (b['caption'], b['width'], b['height'], b['tilt']) == (
        a['caption'], a['width'], a['height'], a['tilt'])
    (cx, cy), r = b['centre'], b['radius']
    assert r <= cx <= b['width'] - r and r <= cy <= b['height'] - r


def test_train_never_shows_a_held_out_pair_but_shows_every_shape_and_colour():
  """'train' draws only the 52 pairs outside HELD_OUT, and all of them, so
  every shape and every colour is seen in training."""
  seen = set(pairs_of(SyntheticSource(size=3000, seed=0, **SMALL), 3000))
  assert not seen & HELD_OUT
  assert {shape for shape, _ in seen} == set(SHAPES)
  assert {colour for _, colour in seen} == set(COLOURS)
  assert len(seen) == len(SHAPES) * len(COLOURS) - len(HELD_OUT) == 52


def test_heldout_split_shows_only_and_all_held_out_pairs():
  """'heldout' draws exactly the HELD_OUT pairs; 'all' draws all 64."""
  heldout = SyntheticSource(size=600, seed=0, split='heldout', **SMALL)
  assert set(pairs_of(heldout, 600)) == HELD_OUT
  every = SyntheticSource(size=3000, seed=0, split='all', **SMALL)
  assert len(set(pairs_of(every, 3000))) == 64


def test_held_out_design():
  """HELD_OUT holds 12 valid pairs with no shape or colour held out more
  than twice, and held_out_class_ids names exactly them."""
  assert len(HELD_OUT) == 12
  for shape, colour in HELD_OUT:
    assert shape in SHAPES and colour in COLOURS
  for name in SHAPES:
    assert sum(shape == name for shape, _ in HELD_OUT) <= 2
  for name in COLOURS:
    assert sum(colour == name for _, colour in HELD_OUT) <= 2
  ids = synthetic.held_out_class_ids()
  assert ids == sorted(ids) and len(ids) == 12
  names = synthetic.class_names()
  assert {names[i] for i in ids} == {f'{c} {s}' for s, c in HELD_OUT}


def test_class_names_are_every_pair_once_indexed_by_class_id():
  """class_names has len(SHAPES) * len(COLOURS) unique 'colour shape'
  entries, and class_id indexes into it."""
  names = synthetic.class_names()
  assert len(names) == len(SHAPES) * len(COLOURS) == 64
  assert len(set(names)) == len(names)
  for shape in SHAPES:
    for colour in COLOURS:
      assert names[synthetic.class_id(shape, colour)] == f'{colour} {shape}'


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1),
       min_side=st.integers(1, 64), extra=st.integers(0, 400),
       max_aspect=st.floats(1.0, 8.0))
def test_sizes_stay_within_bounds(index, seed, min_side, extra, max_aspect):
  """Every example's width and height lie in [min_side, max_side] and its
  aspect ratio is at most max_aspect, for any bounds and index."""
  max_side = min_side + extra
  source = SyntheticSource(size=10**6 + 1, seed=seed, min_side=min_side,
                           max_side=max_side, max_aspect=max_aspect)
  a = source.attributes(index)
  width, height = a['width'], a['height']
  assert min_side <= width <= max_side and min_side <= height <= max_side
  assert max(width, height) / min(width, height) <= max_aspect + 1e-9
  # The object fits inside the image.
  cx, cy = a['centre']
  assert a['radius'] <= cx <= width - a['radius'] + 1e-9
  assert a['radius'] <= cy <= height - a['radius'] + 1e-9


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 10**5), split=st.sampled_from(synthetic.SPLITS))
def test_caption_names_the_shape_and_colour(index, split):
  """The caption contains the drawn shape and colour as words, and the
  class_id is that pair's."""
  a = SyntheticSource(size=10**5 + 1, seed=0, split=split).attributes(index)
  words = a['caption'].replace(',', ' ').split()
  assert a['shape'] in words and a['colour'] in words
  assert a['class_id'] == synthetic.class_id(a['shape'], a['colour'])
  assert (split != 'train') or (a['shape'], a['colour']) not in HELD_OUT
  assert (split != 'heldout') or (a['shape'], a['colour']) in HELD_OUT


@pytest.mark.parametrize('image_format, magic', [
    ('jpeg', b'\xff\xd8\xff'), ('png', b'\x89PNG'), ('webp', b'RIFF')])
def test_every_image_format_decodes(image_format, magic):
  """Each image_format writes that format, and decode_image reads it back
  at the size the attributes give."""
  source = SyntheticSource(size=5, seed=2, image_format=image_format, **SMALL)
  for i in range(5):
    record = source[i]
    assert isinstance(record, sources.Record)
    assert record.image.startswith(magic) and not record.error
    a = source.attributes(i)
    assert decode_image(record.image).shape == (a['height'], a['width'], 3)


def test_bad_arguments_and_indices_are_errors():
  """Unknown split or format, negative size, bad side bounds or aspect:
  ValueError naming the problem; an index outside [0, size): IndexError."""
  with pytest.raises(ValueError, match='split'):
    SyntheticSource(size=1, split='test')
  with pytest.raises(ValueError, match='gif'):
    SyntheticSource(size=1, image_format='gif')
  with pytest.raises(ValueError, match='size'):
    SyntheticSource(size=-1)
  with pytest.raises(ValueError, match='min_side'):
    SyntheticSource(size=1, min_side=64, max_side=32)
  with pytest.raises(ValueError, match='max_aspect'):
    SyntheticSource(size=1, max_aspect=0.5)
  for scale in (0, -1, 1.5):
    with pytest.raises(ValueError, match='object_scale'):
      SyntheticSource(size=1, object_scale=scale)
  source = SyntheticSource(size=3, **SMALL)
  assert len(source) == 3
  for index in (3, -1, 100):
    with pytest.raises(IndexError):
      source[index]
    with pytest.raises(IndexError):
      source.attributes(index)
