"""Robust image decoding: encoded bytes -> uint8 RGB array, or a `BadImage`.

Web-scale image-text data holds every kind of broken or odd file. Decoding
never crashes the pipeline: each failure becomes a `BadImage` with a short
reason, which the pipeline counts in a `SkipCounter` and moves on.
"""

import collections
import io
import struct
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

# PIL.Image.MAX_IMAGE_PIXELS, the default cap: about a 9459 x 9459 image.
DEFAULT_MAX_PIXELS = 89_478_485

# Formats worth decoding for image-text data. Naming them keeps PIL from
# trying every plugin it has on arbitrary bytes (EPS would run ghostscript).
# Only names this Pillow registers: an unknown one makes Image.open raise
# KeyError (Pillow 13 has no separate MPO opener; JPEG opens MPO files).
Image.init()
_FORMATS = tuple(f for f in ('JPEG', 'MPO', 'PNG', 'WEBP', 'GIF', 'BMP', 'TIFF')
                 if f in Image.OPEN)

_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112

# How files of those formats begin (BMP's 'BM' is too short to tell from
# text). Bytes that begin so but that no opener accepts are an image whose
# header is damaged or cut short, not something other than an image.
_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a',
               b'II*\x00', b'MM\x00*')


def _tiff_pages(data: bytes) -> int:
  """How many image directories (pages) a TIFF's structure holds; 0 when
  the header or a directory is damaged or cut short (or loops)."""
  order = {b'II': '<', b'MM': '>'}.get(data[:2])
  if order is None or len(data) < 8:
    return 0
  offset, seen = struct.unpack(order + 'I', data[4:8])[0], set()
  while offset:
    if offset in seen or offset + 2 > len(data) or len(seen) > 10_000:
      return 0
    seen.add(offset)
    entries = struct.unpack(order + 'H', data[offset:offset + 2])[0]
    end = offset + 2 + 12 * entries
    if not entries or end + 4 > len(data):
      return 0
    offset = struct.unpack(order + 'I', data[end:end + 4])[0]
  return len(seen)


def _looks_like_image(data: bytes) -> bool:
  return data.startswith(_SIGNATURES) or (
      data[:4] == b'RIFF' and data[8:12] == b'WEBP')


class BadImage(ValueError):
  """An image that cannot be used; `reason` is a short key for counting.

  Reasons: 'empty' (no bytes), 'not_image' (not a supported image format),
  'unsupported' (a well-formed file of a kind PIL cannot decode, such as a
  TIFF of 5 samples a pixel), 'too_large' (over the pixel budget),
  'truncated', 'corrupt'.
  """

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """`decode_oriented`'s image alone."""
  return decode_oriented(data, max_pixels)[0]


def decode_oriented(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
                    ) -> tuple[np.ndarray, int]:
  """Decodes JPEG/PNG/WebP/GIF (first frame)/BMP/TIFF bytes to uint8 [H, W, 3],
  and says which EXIF orientation (1..8; 1 for none) it applied.

  The EXIF orientation is applied, so the array is the image as a viewer shows
  it (a box of the stored pixels follows it: `boxes.oriented`). Every mode
  becomes RGB; transparency is composited onto white. Images over
  `max_pixels` are refused from their header, before any pixel is decoded.
  PIL's own bomb limit (2 * PIL.Image.MAX_IMAGE_PIXELS) also applies.

  Raises:
    BadImage: with reason 'empty', 'not_image', 'unsupported', 'too_large',
      'truncated' or 'corrupt'.
  """
  if not data:
    raise BadImage('empty', 'zero bytes')
  with warnings.catch_warnings():
    # PIL warns between its limit and twice it; our own check decides.
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    try:
      image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
      raise BadImage('too_large', str(e)) from e
    except Image.UnidentifiedImageError as e:
      pages = _tiff_pages(data)
      if pages > 1:  # well-formed pages PIL cannot read (a cut single page is corrupt)
        raise BadImage('unsupported', f'TIFF with {pages} page(s) whose pixel '
                       'layout PIL cannot decode') from e
      if _looks_like_image(data):
        raise BadImage('corrupt', f'{len(data)} bytes, image header damaged '
                       'or cut short') from e
      raise BadImage('not_image', f'{len(data)} bytes, no known image header') from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
      if 'truncated' in str(e).lower() or isinstance(e, EOFError):
        raise BadImage('truncated', f'header: {e}') from e
      raise BadImage('corrupt', f'header: {e}') from e

  width, height = image.size
  if width <= 0 or height <= 0:
    raise BadImage('corrupt', f'size {width}x{height}')
  if width * height > max_pixels:
    raise BadImage('too_large', f'{width}x{height} > {max_pixels} pixels')

  try:
    image.load()  # The first frame only, for animations.
    image, orientation = _exif_transposed(image)
    return _to_rgb(image), orientation
  except (OSError, EOFError) as e:
    if 'truncated' in str(e).lower() or isinstance(e, EOFError):
      raise BadImage('truncated', str(e)) from e
    raise BadImage('corrupt', str(e)) from e
  except (SyntaxError, ValueError, IndexError, KeyError, TypeError,
          MemoryError) as e:
    # Pillow's plugins raise all of these on malformed streams.
    raise BadImage('corrupt', f'{type(e).__name__}: {e}') from e


def _exif_transposed(image: Image.Image) -> tuple[Image.Image, int]:
  """Applies the EXIF orientation, and says which (1: none); a malformed
  EXIF block is ignored."""
  try:
    # What exif_transpose reads; 1 and unknown values leave the image as is.
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    transposed = ImageOps.exif_transpose(image)
  except (SyntaxError, ValueError, KeyError, TypeError, struct.error):
    # The pixels are fine; only the metadata is broken.
    return image, 1
  return transposed, int(orientation) if orientation in range(2, 9) else 1


def _to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]."""
  mode = image.mode
  if mode == 'RGB':
    rgb = image
  elif mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      mode == 'P' and 'transparency' in image.info) or (
          mode in ('L', 'RGB') and 'transparency' in image.info):
    # Without compositing, fully transparent pixels keep whatever colour
    # they store (often black), so transparent logos would turn black.
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _WHITE + (255,))
    rgb = Image.alpha_composite(background, rgba).convert('RGB')
  elif mode.startswith('I'):
    # 16-bit (and 32-bit integer) grey: PIL's convert('L') clips at 255,
    # which turns almost every pixel white, so rescale the 16-bit range.
    grey = np.asarray(image).astype(np.float64)
    return _grey_to_rgb(np.clip(grey, 0, 65535) / 257.0)
  elif mode == 'F':
    # Float images conventionally hold [0, 1].
    grey = np.asarray(image).astype(np.float64)
    return _grey_to_rgb(np.clip(np.nan_to_num(grey), 0, 1) * 255.0)
  else:  # '1', 'L', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV'.
    rgb = image.convert('RGB')
  return np.asarray(rgb, dtype=np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  grey = np.round(grey).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


class SkipCounter:
  """Counts skipped records by reason; its dict form is loggable and saveable.

  `SkipCounter(counter.as_dict())` restores a counter, e.g. from the
  pipeline's checkpointed state.
  """

  def __init__(self, counts=None):
    self._counts = collections.Counter()
    for reason, n in dict(counts or {}).items():
      self.add(reason, n)

  def add(self, reason: str, n: int = 1) -> None:
    """Counts `n` more records skipped for `reason`."""
    if n < 0:
      raise ValueError(f'skip count for {reason!r} must be >= 0, got {n}')
    if n:
      self._counts[str(reason)] += int(n)

  def merge(self, other: 'SkipCounter') -> 'SkipCounter':
    """Adds another counter's counts into this one (e.g. across workers)."""
    for reason, n in other.counts.items():
      self.add(reason, n)
    return self

  @property
  def counts(self) -> dict:
    """Reason -> count, sorted by reason."""
    return dict(sorted(self._counts.items()))

  @property
  def total(self) -> int:
    return sum(self._counts.values())

  def as_dict(self, prefix: str = '') -> dict:
    """Counts keyed `prefix + reason`: 'skipped/' for metrics, '' for state."""
    return {prefix + reason: n for reason, n in self.counts.items()}

  def __eq__(self, other):
    return isinstance(other, SkipCounter) and self.counts == other.counts

  def __repr__(self):
    return f'SkipCounter({self.counts})'
