"""LocCa's box tasks as decoder token sequences: the shared token format.

Referring expressions (ARef: region text -> its box) and grounded captioning
(GCap: box -> its region text) are trained by the captioning decoder on
token sequences beside the captions. A box corner coordinate, normalised to
[0, 1] of the image as shown, is one location token of `bins` bins; the
location and task tokens sit after the text tower's vocabulary, so they
never reach the text tower and the decoder alone grows its vocabulary.

A box is (ymin, xmin, ymax, xmax), normalised to the image's stored
pixels (as TFDS and tf.image decode them, EXIF ignored). The pipeline
shows a global image as `decode.py` decodes it, EXIF orientation applied,
so the box is turned with it (`oriented`); then it resizes the image whole
to its patch grid, never crops it, so normalised coordinates hold
unchanged for the image as packed (token dropping leaves the frame alone).

Sequences of length T (`text_len`), padded with the tokenizer's pad id:

  ARef  [aref_token] + region text (no EOS) + [4 location tokens] + pad...
        targets: the 4 location tokens
  GCap  [gcap_token] + [4 location tokens] + region text + EOS + pad...
        targets: the region text and its EOS

The text is cut so the sequence fits T (GCap: text and EOS cut together,
as a caption is, EOS kept with `sticky_eos`). An ARef needs its box and at
least one text token (a text to refer by), a GCap at least one target:
what does not fit T, or an ARef of an empty text, is not made (None). The decoder reads its BOS at position 0 and token t - 1 at
t, so the task token is an input and never a target.

Each image with regions gets one task per epoch: which region and which
task (half each) are drawn keyed by (seed, example index, epoch)
(`draw_task`), so a restored pipeline draws the same.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

AREF, GCAP = 'aref', 'gcap'
TASKS = (AREF, GCAP)
_BOX_TASK_TAG = 0x6278
# The shortest sequence in which both tasks are made for any region.
MIN_TEXT_LEN = 6


@dataclasses.dataclass(frozen=True)
class BoxFormat:
  """Token ids of the box tasks in the decoder's vocabulary."""
  vocab_offset: int  # The text vocabulary's size: the first location token.
  bins: int          # Location tokens, one per bin of a normalised coordinate.

  @property
  def aref_token(self) -> int:
    return self.vocab_offset + self.bins

  @property
  def gcap_token(self) -> int:
    return self.vocab_offset + self.bins + 1

  @property
  def vocab_size(self) -> int:
    """The decoder's vocabulary with the box tasks."""
    return self.vocab_offset + self.bins + 2


def format_of_model(model_config) -> BoxFormat:
  """The box format of a model config: `text.vocab_size` and
  `decoder.box_bins`."""
  return BoxFormat(model_config.text.vocab_size, model_config.decoder.box_bins)


def format_from_config(config) -> BoxFormat:
  """The box format of a whole config (its `model`)."""
  return format_of_model(config.model)


class Region(NamedTuple):
  """One box of an image and the text that names it."""
  ymin: float
  xmin: float
  ymax: float
  xmax: float
  text: str

  @property
  def box(self) -> tuple[float, float, float, float]:
    return (self.ymin, self.xmin, self.ymax, self.xmax)


def parse_regions(coordinates, texts) -> tuple[Region, ...]:
  """Regions from a flat list of 4n coordinates (ymin, xmin, ymax, xmax per
  box, normalised) and n texts; ValueError saying what is wrong with them
  (a source then drops the record's boxes and counts it)."""
  coordinates = np.asarray(coordinates, np.float64).reshape(-1)
  texts = list(texts)
  if coordinates.size != 4 * len(texts):
    raise ValueError(f'{coordinates.size} box coordinates for {len(texts)} '
                     'region texts (expected 4 per text)')
  boxes = coordinates.reshape(-1, 4)
  if not np.all(np.isfinite(boxes)) or np.any((boxes < 0) | (boxes > 1)):
    raise ValueError('a box coordinate is not a number in [0, 1]')
  if np.any(boxes[:, 0] > boxes[:, 2]) or np.any(boxes[:, 1] > boxes[:, 3]):
    raise ValueError('a box has ymin > ymax or xmin > xmax')
  if not all(isinstance(t, str) and t.strip() for t in texts):
    raise ValueError('a region text is empty')
  return tuple(Region(*map(float, box), text.strip())
               for box, text in zip(boxes, texts))


# EXIF orientation -> where a stored point (y, x), normalised, lands in the
# image as shown: (swap y and x first, then flip y, then flip x).
_ORIENTATIONS = {1: (False, False, False), 2: (False, False, True),
                 3: (False, True, True), 4: (False, True, False),
                 5: (True, False, False), 6: (True, False, True),
                 7: (True, True, True), 8: (True, True, False)}


def oriented(box, orientation: int) -> tuple[float, float, float, float]:
  """A box of the stored pixels, in the image shown after EXIF
  `orientation` (1..8, as `decode.decode_oriented` reports it)."""
  ymin, xmin, ymax, xmax = box
  swap, flip_y, flip_x = _ORIENTATIONS[orientation]
  if swap:
    ymin, xmin, ymax, xmax = xmin, ymin, xmax, ymax
  if flip_y:
    ymin, ymax = 1 - ymax, 1 - ymin
  if flip_x:
    xmin, xmax = 1 - xmax, 1 - xmin
  return ymin, xmin, ymax, xmax


def quantise(coordinates, bins: int) -> np.ndarray:
  """int32 bins of normalised coordinates: min(floor(x * bins), bins - 1)."""
  x = np.asarray(coordinates, np.float64)
  return np.minimum(np.floor(x * bins), bins - 1).astype(np.int32)


def dequantise(bins_, bins: int) -> np.ndarray:
  """Each bin's centre, normalised: within half a bin of what it came from."""
  return (np.asarray(bins_, np.float64) + 0.5) / bins


def location_tokens(box, box_format: BoxFormat) -> np.ndarray:
  """int32 [4]: the location tokens of (ymin, xmin, ymax, xmax)."""
  return box_format.vocab_offset + quantise(box, box_format.bins)


def text_ids(tokens, pad_id: int, eos_id: int) -> np.ndarray:
  """A tokenizer's row (text, EOS, pad...) as the text's own ids: padding
  and a final EOS removed."""
  tokens = np.asarray(tokens, np.int32)
  real = np.flatnonzero(tokens != pad_id)
  ids = tokens[:real[-1] + 1] if real.size else tokens[:0]
  return ids[:-1] if ids.size and ids[-1] == eos_id else ids


def aref_sequence(text, box, box_format: BoxFormat, length: int,
                  pad_id: int):
  """(int32 [length] tokens, bool [length] targets) of an ARef, or None."""
  room = length - 5  # The task token and the box.
  text = np.asarray(text, np.int32)[:max(room, 0)]
  if not text.size:
    return None
  body = np.concatenate([[box_format.aref_token], text,
                         location_tokens(box, box_format)])
  targets = np.arange(body.size) >= 1 + text.size
  return _padded(body, targets, length, pad_id)


def gcap_sequence(text, box, box_format: BoxFormat, length: int, pad_id: int,
                  eos_id: int, sticky_eos: bool = False):
  """(int32 [length] tokens, bool [length] targets) of a GCap, or None."""
  room = length - 5
  if room < 1:
    return None
  said = np.append(np.asarray(text, np.int32), eos_id)
  if said.size > room:
    said = said[:room]
    if sticky_eos:
      said[-1] = eos_id
  body = np.concatenate([[box_format.gcap_token],
                         location_tokens(box, box_format), said])
  targets = np.arange(body.size) >= 5
  return _padded(body, targets, length, pad_id)


def _padded(body, targets, length: int, pad_id: int):
  tokens = np.full(length, pad_id, np.int32)
  tokens[:body.size] = body
  target = np.zeros(length, np.bool_)
  target[:body.size] = targets
  return tokens, target


def draw_task(num_regions: int, *, seed: int, index: int,
              epoch: int) -> tuple[int, str]:
  """(region number, 'aref' or 'gcap') of example `index` in `epoch`."""
  rng = np.random.default_rng([seed, _BOX_TASK_TAG, index, epoch])
  return int(rng.integers(num_regions)), TASKS[int(rng.integers(2))]
