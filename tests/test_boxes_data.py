"""LocCa's box tasks on the data side: the token format (boxes.py), boxes
read from TFRecord features (bad box data dropped and counted), the
synthetic source's shape boxes, and box/* in the pipeline's batches."""

import dataclasses
import json

import numpy as np
import pytest

import data_fixtures as fx
from lit_navit.data import batch as batch_lib
from lit_navit.data import boxes
from lit_navit.data import decode
from lit_navit.data import patches as patches_lib
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import readers
from lit_navit.data import sources
from lit_navit.data import synthetic
from lit_navit.data import text

TEXT_LEN = 10
BINS = 50


@pytest.fixture(scope='module')
def tokenizer():
  return text.Tokenizer(text.default_tokenizer_path(), TEXT_LEN)


@pytest.fixture(scope='module')
def box_format(tokenizer):
  return boxes.BoxFormat(tokenizer.vocab_size, BINS)


# The token format.


@pytest.mark.parametrize('bins', [1, 7, 500])
def test_quantise_round_trips_within_one_bin(bins):
  x = np.concatenate([np.random.default_rng(0).uniform(0, 1, 1000),
                      np.arange(bins + 1) / bins, [0.0, 1.0]])
  q = boxes.quantise(x, bins)
  assert q.dtype == np.int32 and q.min() >= 0 and q.max() <= bins - 1
  # Within one bin: the bin's centre is at most half a bin away.
  assert np.all(np.abs(boxes.dequantise(q, bins) - x) <= 0.5 / bins + 1e-12)
  # Bin i is [i / bins, (i + 1) / bins); 1.0 falls in the last.
  for within in (0.0, 0.75):
    np.testing.assert_array_equal(
        boxes.quantise((np.arange(bins) + within) / bins, bins),
        np.arange(bins))
  assert boxes.quantise(1.0, bins) == bins - 1


FORMAT = boxes.BoxFormat(vocab_offset=100, bins=10)
BOX = (0.0, 0.25, 0.5, 1.0)  # Bins 0, 2, 5, 9 -> tokens 100, 102, 105, 109.
LOCATIONS = [100, 102, 105, 109]
AREF, GCAP, PAD, EOS = 110, 111, 0, 1


def test_task_tokens_follow_the_vocabulary():
  assert (FORMAT.aref_token, FORMAT.gcap_token) == (AREF, GCAP)
  np.testing.assert_array_equal(boxes.location_tokens(BOX, FORMAT), LOCATIONS)


@pytest.mark.parametrize('length,text_ids,tokens,targets', [
    # Room to spare: text, then the box as the targets.
    (12, [5, 6, 7], [AREF, 5, 6, 7, *LOCATIONS, PAD, PAD, PAD, PAD],
     [4, 5, 6, 7]),
    # The text is cut so the box fits.
    (7, [5, 6, 7], [AREF, 5, 6, *LOCATIONS], [3, 4, 5, 6]),
    (6, [5, 6, 7], [AREF, 5, *LOCATIONS], [2, 3, 4, 5]),
    # No room for a text token, or no text: not made.
    (5, [5, 6, 7], None, None),
    (12, [], None, None),
])
def test_aref_sequence(length, text_ids, tokens, targets):
  made = boxes.aref_sequence(text_ids, BOX, FORMAT, length, PAD)
  if tokens is None:
    assert made is None
    return
  np.testing.assert_array_equal(made[0], tokens)
  np.testing.assert_array_equal(np.flatnonzero(made[1]), targets)
  assert made[0].dtype == np.int32 and made[1].dtype == np.bool_


@pytest.mark.parametrize('length,sticky,tokens,targets', [
    # Box, then the text and its EOS as the targets.
    (12, False, [GCAP, *LOCATIONS, 5, 6, 7, EOS, PAD, PAD, PAD], [5, 6, 7, 8]),
    (9, False, [GCAP, *LOCATIONS, 5, 6, 7, EOS], [5, 6, 7, 8]),
    # Cut as a caption is: EOS goes first, or stays with sticky EOS.
    (8, False, [GCAP, *LOCATIONS, 5, 6, 7], [5, 6, 7]),
    (7, False, [GCAP, *LOCATIONS, 5, 6], [5, 6]),
    (7, True, [GCAP, *LOCATIONS, 5, EOS], [5, 6]),
    (5, False, None, None),  # No target would fit.
])
def test_gcap_sequence(length, sticky, tokens, targets):
  made = boxes.gcap_sequence([5, 6, 7], BOX, FORMAT, length, PAD, EOS,
                             sticky_eos=sticky)
  if tokens is None:
    assert made is None
    return
  np.testing.assert_array_equal(made[0], tokens)
  np.testing.assert_array_equal(np.flatnonzero(made[1]), targets)


@pytest.mark.parametrize('row,pad,eos,expected', [
    ([5, 6, 7, 1, 0, 0], 0, 1, [5, 6, 7]),
    ([5, 6, 1, 1, 1, 1], 1, 1, [5, 6]),  # SigLIP: pads with its EOS.
    ([5, 6, 7, 8], 0, 1, [5, 6, 7, 8]),  # Cut by the tokenizer: no EOS.
    ([1, 0, 0], 0, 1, []),
])
def test_text_ids_drop_padding_and_eos(row, pad, eos, expected):
  np.testing.assert_array_equal(boxes.text_ids(row, pad, eos), expected)


def test_parse_regions_takes_good_boxes_and_names_what_is_wrong():
  regions = boxes.parse_regions([0.1, 0.2, 0.3, 0.4, 0, 0, 1, 1],
                                [' red circle', 'sky'])
  assert [r.text for r in regions] == ['red circle', 'sky']
  np.testing.assert_allclose(regions[0].box, (0.1, 0.2, 0.3, 0.4))
  assert boxes.parse_regions([], []) == ()
  for coordinates, texts, what in [
      ([0.1, 0.2, 0.3, 0.4], ['a', 'b'], '4 box coordinates for 2'),
      ([0.1, 0.2, 0.3], ['a'], '3 box coordinates'),
      ([0.1, 0.2, 1.3, 0.4], ['a'], '[0, 1]'),
      ([-0.1, 0.2, 0.3, 0.4], ['a'], '[0, 1]'),
      ([0.1, 0.2, float('nan'), 0.4], ['a'], '[0, 1]'),
      ([0.5, 0.2, 0.3, 0.4], ['a'], 'ymin > ymax'),
      ([0.1, 0.5, 0.3, 0.4], ['a'], 'xmin > xmax'),
      ([0.1, 0.2, 0.3, 0.4], ['  '], 'empty'),
  ]:
    with pytest.raises(ValueError, match=what.replace('[', r'\[')
                       .replace(']', r'\]')):
      boxes.parse_regions(coordinates, texts)


def test_draw_task_is_keyed_and_draws_both_tasks():
  draws = [boxes.draw_task(3, seed=0, index=i, epoch=e)
           for i in range(200) for e in range(2)]
  assert draws == [boxes.draw_task(3, seed=0, index=i, epoch=e)
                   for i in range(200) for e in range(2)]
  tasks = [task for _, task in draws]
  assert 0.4 < tasks.count(boxes.AREF) / len(tasks) < 0.6
  assert {region for region, _ in draws} == {0, 1, 2}
  # Another epoch draws anew.
  assert draws[0::2] != draws[1::2]


# EXIF orientation: boxes of the stored pixels follow the image as shown.


STORED = (48, 80)  # Height, width of the stored pixels.
STORED_BOX = (8 / 48, 44 / 80, 28 / 48, 72 / 80)  # A red block's.


def red_block_jpeg(orientation: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = fx.solid((128, 128, 128), STORED[1], STORED[0])
  pixels[8:28, 44:72] = (220, 20, 20)
  exif = Image.Exif()
  exif[0x0112] = orientation
  return fx.encode(pixels, 'JPEG', quality=95, exif=exif)


def red_extent(pixels):
  """(ymin, xmin, ymax, xmax) in pixels of the red pixels' bounding box."""
  ys, xs = np.nonzero((pixels[..., 0] > 150) & (pixels[..., 1] < 90)
                      & (pixels[..., 2] < 90))
  return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])


@pytest.mark.parametrize('orientation', range(1, 9))
def test_oriented_box_follows_the_decoded_image(orientation):
  image, applied = decode.decode_oriented(red_block_jpeg(orientation))
  assert applied == orientation
  height, width = image.shape[:2]
  box = np.asarray(boxes.oriented(STORED_BOX, orientation))
  np.testing.assert_allclose(red_extent(image),
                             box * [height, width, height, width], atol=1.5)


class ExifSource:
  """Red blocks stored on their side (EXIF orientation 6), with the
  block's box in the stored pixels."""

  def __len__(self):
    return 12

  def __getitem__(self, index):
    index = sources.check_index(index, len(self))
    return sources.Record(index, red_block_jpeg(6), 'a red block',
                          f'exif/{index}',
                          boxes=(boxes.Region(*STORED_BOX, 'red block'),))


def slot_pixels(batch, r, k, patch_size):
  """uint8 [rows*p, cols*p, 3]: slot k of row b as packed."""
  where = batch['image/segment'][r] == k + 1
  return patches_lib.unpatchify(patches_lib.Patches(
      batch['image/patches'][r][where], batch['image/yx'][r][where],
      tuple(batch['image/grid'][r, k])), patch_size)


def test_packed_boxes_hold_their_region_in_the_packed_image(tokenizer,
                                                            box_format):
  """End to end: the box a task's tokens say, on the image as packed (EXIF
  turned, resized), holds the red block's pixels and reaches its sides."""
  config = small_config(**{'resolution.min': 48, 'resolution.max': 64,
                           'captions_per_row': None})
  batches, _ = take_batches(ExifSource(), tokenizer, config, box_format, 3)
  checked = 0
  for batch in batches:
    rows_per_group = batch['valid'].shape[0] // batch['text/valid'].shape[0]
    for g, c in zip(*np.nonzero(batch['box/valid'])):
      row_in_group, k = divmod(int(batch['text/slot'][g, c]),
                               config.images_per_row)
      r = g * rows_per_group + row_in_group
      _, box, _ = decode_task(batch['box/tokens'][g, c],
                              batch['box/target'][g, c], box_format,
                              tokenizer.pad_id)
      pixels = slot_pixels(batch, r, k, 8)
      height, width = pixels.shape[:2]
      in_pixels = box * [height, width, height, width]
      # Half a bin from quantising, a pixel or so from resizing.
      slack = 0.5 / BINS * np.array([height, width, height, width]) + 1.5
      assert np.all(np.abs(red_extent(pixels) - in_pixels) <= slack), (
          red_extent(pixels), in_pixels)
      checked += 1
  assert checked >= 6


# TFRecord box features.


def box_example(image: bytes, caption: str, coordinates=None, texts=None,
                box_key='objects/bbox', text_key='objects/text') -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  def strings(*values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  feature = {'jpg': strings(image), 'txt': strings(caption.encode())}
  if coordinates is not None:
    if isinstance(coordinates, bytes):  # The wrong kind of feature.
      feature[box_key] = strings(coordinates)
    else:
      feature[box_key] = tf.train.Feature(
          float_list=tf.train.FloatList(value=coordinates))
  if texts is not None:
    feature[text_key] = strings(*[t.encode() for t in texts])
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


# (coordinates, texts, what the record's boxes are: regions or the bad reason)
TFRECORD_BOXES = [
    ([0.125, 0.25, 0.5, 0.75, 0.0, 0.0, 1.0, 1.0], ['red circle', 'sky'], 2),
    (None, None, 0),  # No box features: no boxes, nothing wrong.
    ([0.1, 0.2, 0.3, 0.4], ['a', 'b'], 'coordinates for 2'),
    ([0.1, 0.2, 0.3, 1.5], ['a'], '[0, 1]'),
    ([0.6, 0.2, 0.3, 0.4], ['a'], 'ymin > ymax'),
    (b'0.1 0.2 0.3 0.4', ['a'], 'not a float list'),
    ([0.1, 0.2, 0.3, 0.4], None, 'coordinates for 0'),
    ([0.25, 0.5, 0.75, 1.0], ['blue square'], 1),
]


@pytest.fixture(scope='module')
def box_tfrecord(tmp_path_factory):
  folder = tmp_path_factory.mktemp('boxes')
  payloads = [box_example(fx.encode(fx.solid((10 * i, 50, 90), 16, 12)),
                          f'caption {i}', coordinates, texts)
              for i, (coordinates, texts, _) in enumerate(TFRECORD_BOXES)]
  return fx.write_tfrecord(folder / 'boxes.tfrecord', payloads)


def assert_boxes_as_stored(records):
  for record, (coordinates, texts, expected) in zip(records, TFRECORD_BOXES):
    assert not record.error and record.image
    assert record.caption == f'caption {records.index(record)}'
    if isinstance(expected, str):
      assert record.boxes == ()
      assert record.box_error.startswith('bad_boxes: ')
      assert expected in record.box_error
      continue
    assert not record.box_error and len(record.boxes) == expected
    for n, region in enumerate(record.boxes):
      assert region.text == texts[n]
      np.testing.assert_allclose(region.box, coordinates[4 * n:4 * n + 4],
                                 atol=1e-7)


def source_config(path, **overrides):
  config = sources.default_source_config()
  config.update(kind='tfrecord', path=str(path), **overrides)
  return config


def test_tfrecord_source_and_reader_read_boxes_and_drop_bad_ones(box_tfrecord):
  source = sources.make_source(source_config(box_tfrecord))
  assert_boxes_as_stored([source[i] for i in range(len(source))])
  reader = readers.make_reader(source_config(box_tfrecord))
  assert_boxes_as_stored([record for _, _, record in reader.records(0)])


def test_box_feature_names_are_configurable(tmp_path):
  path = fx.write_tfrecord(tmp_path / 'custom.tfrecord', [box_example(
      fx.encode(fx.solid((1, 2, 3))), 'c', [0.0, 0.0, 0.5, 0.5], ['thing'],
      box_key='region/box', text_key='region/name')])
  assert sources.make_source(source_config(path))[0].boxes == ()
  custom = source_config(path, box_key='region/box', box_text_key='region/name')
  record = sources.make_source(custom)[0]
  assert [r.text for r in record.boxes] == ['thing']
  (_, _, streamed), = readers.make_reader(custom).records(0)
  assert streamed.boxes == record.boxes
  # Off: '' for both; one without the other is refused naming the key.
  off = source_config(path, box_key='', box_text_key='')
  assert sources.make_source(off)[0].boxes == ()
  with pytest.raises(ValueError, match='box_key'):
    sources.make_source(source_config(path, box_text_key=''))


# JSONL file lists: box fields of a row.

# (row's box fields, what its boxes are: (box, text) pairs or the bad reason)
JSONL_BOXES = [
    ({'boxes': [[0.125, 0.25, 0.5, 0.75]], 'box_texts': ['red circle']},
     [((0.125, 0.25, 0.5, 0.75), 'red circle')]),
    ({'boxes': [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5],
      'box_texts': ['sky', 'dot']},
     [((0.0, 0.0, 1.0, 1.0), 'sky'), ((0.5, 0.5, 0.5, 0.5), 'dot')]),
    ({}, []),
    ({'boxes': [[0.1, 0.2, 0.3]], 'box_texts': ['a']}, '3 box coordinates'),
    ({'boxes': [[0.1, 0.2], [0.3]], 'box_texts': ['a']}, 'bad_boxes'),
    ({'boxes': 'somewhere', 'box_texts': ['a']}, 'bad_boxes'),
    ({'boxes': [{'y': 1}], 'box_texts': ['a']}, 'bad_boxes'),
    ({'boxes': [[0.1, 0.2, 0.3, 0.4]], 'box_texts': 'a'}, 'not a list'),
    ({'boxes': [[0.1, 0.2, 0.3, 0.4]], 'box_texts': [7]}, 'empty'),
    ({'box_texts': ['a']}, 'coordinates for 1'),
]


def test_jsonl_lists_read_boxes_and_drop_bad_ones(tmp_path):
  image = fx.encode(fx.solid((1, 2, 3)))
  (tmp_path / 'a.png').write_bytes(image)
  rows = [json.dumps({'image': 'a.png', 'caption': f'caption {i}', **fields})
          for i, (fields, _) in enumerate(JSONL_BOXES)]
  (tmp_path / 'list.jsonl').write_text('\n'.join(rows) + '\n')
  config = sources.default_source_config()
  config.update(kind='files', path=str(tmp_path / 'list.jsonl'))
  source = sources.make_source(config)
  streamed = [r for _, _, r in readers.make_reader(config).records(0)]
  for records in ([source[i] for i in range(len(source))], streamed):
    assert len(records) == len(JSONL_BOXES)
    for i, (record, (_, expected)) in enumerate(zip(records, JSONL_BOXES)):
      assert record.image == image and record.caption == f'caption {i}'
      if isinstance(expected, str):
        assert record.boxes == () and expected in record.box_error
        assert record.box_error.startswith('bad_boxes: ')
      else:
        assert not record.box_error
        assert [(r.box, r.text) for r in record.boxes] == expected


# The synthetic source.


def test_synthetic_boxes_hold_the_drawn_shape():
  """Render each shape (PNG, exact colours) and find its pixels: all lie in
  the box, and a circle's or ring's reach every side of it."""
  source = synthetic.SyntheticSource(48, seed=1, image_format='png',
                                     min_side=24, max_side=96, max_aspect=3)
  shapes_seen = set()
  for i in range(len(source)):
    record, attributes = source[i], source.attributes(i)
    (region,) = record.boxes
    assert region.text == f'{attributes["colour"]} {attributes["shape"]}'
    assert region == attributes['region']
    pixels = decode.decode_image(record.image)
    height, width = pixels.shape[:2]
    ys, xs = np.nonzero(np.all(pixels == attributes['rgb'], axis=-1))
    assert ys.size > 10
    # Pixel centres, in pixels, against the box in pixels (a pixel of
    # slack: the rasteriser fills the pixel an edge touches).
    top, left = region.ymin * height, region.xmin * width
    bottom, right = region.ymax * height, region.xmax * width
    assert ys.min() + 0.5 >= top - 1 and ys.max() + 0.5 <= bottom + 1, i
    assert xs.min() + 0.5 >= left - 1 and xs.max() + 0.5 <= right + 1, i
    if attributes['shape'] in ('circle', 'ring'):
      shapes_seen.add(attributes['shape'])
      assert abs(ys.min() - top) <= 1.5 and abs(ys.max() + 1 - bottom) <= 1.5
      assert abs(xs.min() - left) <= 1.5 and abs(xs.max() + 1 - right) <= 1.5
  assert shapes_seen == {'circle', 'ring'}


# The pipeline.


class SomeWithoutBoxes:
  """A synthetic source whose every third record has no boxes, and whose
  every fifth has two (its shape's, then a whole-image 'background')."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    if index % 3 == 0:
      return dataclasses.replace(record, boxes=())
    if index % 5 == 0:
      whole = boxes.Region(0.0, 0.0, 1.0, 1.0, 'background')
      return dataclasses.replace(record, boxes=record.boxes + (whole,))
    return record


def small_source(size=40):
  return SomeWithoutBoxes(synthetic.SyntheticSource(size, seed=2, min_side=16,
                                                    max_side=80))


def small_config(**overrides):
  config = pipeline_lib.default_config()
  config.update(tokens_per_row=64, images_per_row=6, text_len=TEXT_LEN,
                patch_sizes=(8,), pack_buffer=16, shuffle_buffer=16,
                workers=0, box_tasks=True, captions_per_row=3.0)
  config.resolution.update(min=16, max=64)
  config.update_from_flattened_dict(overrides)
  return config


def take_batches(source, tokenizer, config, box_format, steps, **kwargs):
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=5,
                             groups=2, box_format=box_format, **kwargs) as pipe:
    return fx.take(pipe, steps), pipe


def decode_task(tokens, target, box_format, pad_id):
  """(task, box, text ids) of a box task sequence, checking its targets."""
  tokens = np.asarray(tokens)
  real = tokens[:np.flatnonzero(tokens != pad_id)[-1] + 1]
  offset = box_format.vocab_offset
  if real[0] == box_format.aref_token:
    locations = real[-4:]
    np.testing.assert_array_equal(np.flatnonzero(target),
                                  np.arange(real.size - 4, real.size))
    text_ids = real[1:-4]
    task = boxes.AREF
  else:
    assert real[0] == box_format.gcap_token
    locations, text_ids = real[1:5], real[5:]
    np.testing.assert_array_equal(np.flatnonzero(target),
                                  np.arange(5, real.size))
    task = boxes.GCAP
  assert np.all((locations >= offset) & (locations < offset + box_format.bins))
  assert np.all(text_ids < offset)  # Text: the tokenizer's own vocabulary.
  return task, boxes.dequantise(locations - offset, box_format.bins), text_ids


@pytest.mark.parametrize('layout', ['captions', 'packed_text', 'crops'])
def test_box_tasks_sit_at_their_images_caption_places(tokenizer, box_format,
                                                      layout):
  """box/valid = text/valid & has-box; each task decodes to a region of the
  image of its caption's slot, in the contract's format; crops get none."""
  overrides = {'text_packing': layout == 'packed_text'}
  if layout == 'crops':
    overrides.update({'local_crops.count': 1, 'local_crops.max_tokens': 4})
  source = small_source()
  config = small_config(**overrides)
  batches, pipe = take_batches(source, tokenizer, config, box_format, 10)
  spec = pipe.batch_spec(8)
  assert spec.box_tasks and spec.packed_text == (layout == 'packed_text')
  tasks, made = [], 0
  for batch in batches:
    batch_lib.validate_batch(batch, spec, pad_id=tokenizer.pad_id)
    slot_index = batch['index'].reshape(spec.groups, -1)  # [G, B/G * E]
    for g, c in np.ndindex(*batch['text/valid'].shape):
      has_box = False
      if batch['text/valid'][g, c]:
        index = slot_index[g, batch['text/slot'][g, c]]
        has_box = bool(source[index].boxes)
      assert batch['box/valid'][g, c] == has_box
      if not has_box:
        continue
      task, box, text_ids = decode_task(batch['box/tokens'][g, c],
                                        batch['box/target'][g, c], box_format,
                                        tokenizer.pad_id)
      # One of its image's regions, to within a bin, named by its text.
      matches = [r for r in source[index].boxes
                 if np.all(np.abs(np.asarray(r.box) - box) <= 1 / BINS)]
      assert matches, (index, box)
      said = boxes.text_ids(tokenizer.encode([matches[0].text])[0],
                            tokenizer.pad_id, tokenizer.eos_id)
      if task == boxes.GCAP:
        said = np.append(said, tokenizer.eos_id)
      # The text, cut to what T leaves beside the task token and the box.
      np.testing.assert_array_equal(text_ids, said[:TEXT_LEN - 5])
      tasks.append((task, matches[0].text))
      made += 1
    if layout == 'crops':
      # Every caption place (a global image) with a box, and nothing else.
      with_box = sum(bool(source[i].boxes) for i in
                     batch['index'][batch_lib.global_slots(batch)])
      assert batch['box/valid'].sum() == with_box
      assert batch_lib.global_slots(batch).sum() < batch['valid'].sum()
  assert made >= 10
  assert {task for task, _ in tasks} == {boxes.AREF, boxes.GCAP}
  assert 'background' in {text for _, text in tasks}  # A second region drawn.


def test_box_draws_resume_bitwise_from_every_state(tokenizer, box_format):
  source = small_source(size=24)
  config = small_config(**{'patch_sizes': (4, 8), 'token_drop.kind': 'beta',
                           'token_drop.rate': 0.3, 'text_packing': True})
  steps = 14
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=5,
                             groups=2, box_format=box_format) as pipe:
    states, batches = [], []
    for _ in range(steps):
      states.append(json.loads(json.dumps(pipe.get_state())))
      batches.append(next(pipe))
  assert pipe.get_state()['stream']['epoch'] >= 2
  # Each epoch draws its tasks anew: some example's task changes.
  seen = {}
  for batch in batches:
    for g, c in zip(*np.nonzero(batch['box/valid'])):
      index = batch['index'].reshape(2, -1)[g, batch['text/slot'][g, c]]
      sequence = batch['box/tokens'][g, c].tobytes()
      seen.setdefault(int(index), set()).add(sequence)
  assert any(len(sequences) > 1 for sequences in seen.values())
  for step in range(0, steps, 3):
    with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=5,
                               groups=2, box_format=box_format) as restored:
      restored.set_state(states[step])
      fx.assert_same_batches(fx.take(restored, steps - step), batches[step:])


@pytest.mark.parametrize('text_packing', [False, True])
def test_without_box_tasks_batches_are_as_before(tokenizer, box_format,
                                                 text_packing):
  """Off: no box/* and the same spec; on: the same batches plus box/*, the
  same state. Box tasks change nothing else (see also test_pipeline)."""
  source = small_source()
  config = small_config(text_packing=text_packing, **{
      'local_crops.count': 1, 'local_crops.max_tokens': 4, 'mask_ratio': 0.5})
  on, on_pipe = take_batches(source, tokenizer, config, box_format, 6)
  config.box_tasks = False
  off, off_pipe = take_batches(source, tokenizer, config, None, 6)
  assert dataclasses.replace(on_pipe.batch_spec(8), box_tasks=False) == (
      off_pipe.batch_spec(8))
  assert not off_pipe.batch_spec(8).box_tasks
  fx.assert_same_batches(off, [{k: v for k, v in b.items()
                                if not k.startswith('box/')} for b in on])
  assert all(set(b) == set(off_pipe.batch_spec(8).shapes()) for b in off)
  assert on_pipe.get_state() == off_pipe.get_state()
  # Eval mode makes none either.
  config.box_tasks = True
  config.mode = 'eval'
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=2, seed=5,
                             box_format=box_format) as pipe:
    assert not any(key.startswith('box/') for key in next(pipe))


def test_bad_box_data_is_counted_and_the_record_kept(tokenizer, box_format,
                                                     box_tfrecord):
  reader = readers.make_reader(source_config(box_tfrecord))
  config = small_config(**{'pack_buffer': 8, 'shuffle': False,
                           'captions_per_row': None,
                           'resolution.min': 12, 'resolution.max': 16})
  batches, pipe = take_batches(reader, tokenizer, config, box_format, 1)
  bad = sum(isinstance(expected, str) for _, _, expected in TFRECORD_BOXES)
  assert pipe.skipped.counts.get('bad_boxes') == bad
  batch = batches[0]
  # Every record is packed, with its caption; those with boxes have tasks.
  slot_index = batch['index'].reshape(2, -1)
  has_task = {}
  for g, c in zip(*np.nonzero(batch['text/valid'])):
    has_task[int(slot_index[g, batch['text/slot'][g, c]])] = bool(
        batch['box/valid'][g, c])
  assert has_task == {readers.example_id(0, n): isinstance(expected, int)
                      and expected > 0
                      for n, (_, _, expected) in enumerate(TFRECORD_BOXES)}
  # With box tasks off nothing is counted.
  config.box_tasks = False
  _, pipe = take_batches(reader, tokenizer, config, None, 1)
  assert 'bad_boxes' not in pipe.skipped.counts


@pytest.mark.parametrize('overrides,key', [
    ({'text_len': 5}, 'input.text_len'),
    ({'source.box_key': ''}, 'input.source.box_key'),
    ({'source.box_text_field': ''}, 'input.source.box_field'),
])
def test_unusable_box_config_names_its_key(tokenizer, box_format, overrides,
                                           key):
  config = small_config()
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    pipeline_lib.Pipeline(small_source(), tokenizer, config, rows=2, seed=0,
                          box_format=box_format)


def test_box_tasks_need_the_box_format(tokenizer):
  with pytest.raises(ValueError, match=r'input\.box_tasks'):
    pipeline_lib.Pipeline(small_source(), tokenizer, small_config(), rows=2,
                          seed=0)


def test_validate_batch_checks_box_tasks(tokenizer, box_format):
  config = small_config(captions_per_row=None)
  batches, pipe = take_batches(small_source(), tokenizer, config, box_format, 1)
  batch, spec = batches[0], pipe.batch_spec(8)
  batch_lib.validate_batch(batch, spec, pad_id=tokenizer.pad_id)
  assert batch_lib.spec_of(batch).shapes() == spec.shapes()
  g, c = map(int, np.argwhere(batch['box/valid'])[0])
  empty = np.argwhere(~batch['text/valid'])
  broken = []
  moved = {k: v.copy() for k, v in batch.items()}  # A task at an empty place.
  eg, ec = map(int, empty[0])
  moved['box/valid'][eg, ec] = True
  moved['box/tokens'][eg, ec] = batch['box/tokens'][g, c]
  moved['box/target'][eg, ec] = batch['box/target'][g, c]
  broken.append(moved)
  untargeted = {k: v.copy() for k, v in batch.items()}
  untargeted['box/target'][g, c] = False
  broken.append(untargeted)
  stray = {k: v.copy() for k, v in batch.items()}
  stray['box/valid'][g, c] = False
  broken.append(stray)
  for bad in broken:
    with pytest.raises(ValueError, match='box/'):
      batch_lib.validate_batch(bad, spec, pad_id=tokenizer.pad_id)
