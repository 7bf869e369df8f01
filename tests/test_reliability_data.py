"""Decoding: a well-formed image of a kind PIL cannot read is 'unsupported',
not 'corrupt'."""

import io
import struct

import pytest
from PIL import Image

from lit_navit.data import decode


def _tiff(pages, samples=5, width=4, height=4):
  """A little-endian TIFF of `pages` uncompressed pages with `samples` 8-bit
  samples a pixel (5: a layout PIL has no mode for)."""
  out = bytearray(b'II*\x00' + struct.pack('<I', 8))
  for page in range(pages):
    ifd = len(out)
    entries = 9
    bits = ifd + 2 + 12 * entries + 4
    pixels = bits + 2 * samples
    following = pixels + width * height * samples
    out += struct.pack('<H', entries)
    for tag, kind, count, value in [
        (256, 3, 1, width), (257, 3, 1, height), (258, 3, samples, bits),
        (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, pixels), (277, 3, 1, samples),
        (278, 3, 1, height), (279, 4, 1, width * height * samples)]:
      if kind == 3 and count == 1:
        out += struct.pack('<HHIHH', tag, kind, count, value, 0)
      else:
        out += struct.pack('<HHII', tag, kind, count, value)
    out += struct.pack('<I', following if page < pages - 1 else 0)
    out += struct.pack(f'<{samples}H', *[8] * samples) + bytes(width * height * samples)
  return bytes(out)


def test_multipage_tiff_pil_cannot_open_is_unsupported():
  data = _tiff(pages=3)
  with pytest.raises(Image.UnidentifiedImageError):
    Image.open(io.BytesIO(data))
  with pytest.raises(decode.BadImage) as error:
    decode.decode_image(data)
  assert error.value.reason == 'unsupported' and '3 page' in str(error.value)


def test_tiff_with_a_damaged_directory_is_still_corrupt():
  data = _tiff(pages=2)
  with pytest.raises(decode.BadImage) as error:
    decode.decode_image(data[:60])  # cut inside the first directory
  assert error.value.reason == 'corrupt'
