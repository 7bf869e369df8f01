"""decode_image: every format and mode to uint8 RGB, EXIF orientation, and
every kind of bad input to a BadImage with its reason; SkipCounter."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL import ImageFile

import data_fixtures as fx
from lit_navit.data import decode
from lit_navit.data.decode import BadImage, SkipCounter, decode_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def reason_of(data, **kwargs) -> str:
  """decode_image's BadImage reason; fails the test on success or on any
  other exception."""
  with pytest.raises(BadImage) as info:
    decode_image(data, **kwargs)
  return info.value.reason


def assert_rgb(array, height, width):
  assert isinstance(array, np.ndarray)
  assert array.dtype == np.uint8
  assert array.shape == (height, width, 3)


# Formats.


def test_png_and_lossless_webp_decode_exactly():
  """Lossless formats give back the very pixels encoded, as [H, W, 3]."""
  pixels = fx.quadrants(width=20, height=10)
  for data in (fx.encode(pixels, 'PNG'),
               fx.encode(pixels, 'WEBP', lossless=True)):
    out = decode_image(data)
    assert_rgb(out, 10, 20)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_and_lossy_webp_decode_close_to_the_source():
  """Lossy formats keep shape and, for flat colour blocks, the colours."""
  pixels = fx.quadrants(width=32, height=16)
  for data in (fx.encode(pixels, 'JPEG', quality=95),
               fx.encode(pixels, 'WEBP', quality=95)):
    out = decode_image(data)
    assert_rgb(out, 16, 32)
    # Away from the block edges, where compression smears colours.
    for (y, x), colour in [((3, 5), RED), ((3, 27), GREEN), ((12, 5), BLUE),
                           ((12, 27), WHITE)]:
      np.testing.assert_allclose(out[y, x], colour, atol=12)


def test_animated_gif_gives_its_first_frame():
  """Of a red, green, blue animation only frame 0 (red) comes back."""
  frames = [Image.new('RGB', (10, 6), colour) for colour in (RED, GREEN, BLUE)]
  data = fx.encode(frames[0], 'GIF', save_all=True, append_images=frames[1:],
                   duration=40, loop=0)
  assert Image.open(io.BytesIO(data)).n_frames == 3
  out = decode_image(data)
  assert_rgb(out, 6, 10)
  assert np.all(out == np.asarray(RED, np.uint8))


@pytest.mark.parametrize('orientation, corners', [
    # Stored 32 wide x 16 high: red top-left, green top-right, blue
    # bottom-left, white bottom-right. Corners as shown: TL, TR, BL, BR.
    (6, (BLUE, RED, WHITE, GREEN)),   # Shown rotated 90 degrees clockwise.
    (8, (GREEN, WHITE, RED, BLUE)),   # Shown rotated 90 degrees anticlockwise.
])
def test_exif_rotated_jpeg_is_returned_as_shown(orientation, corners):
  """A JPEG with EXIF Orientation 6 or 8 comes back rotated: height and
  width swap and each quadrant lands where a viewer would draw it."""
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = orientation
  data = fx.encode(fx.quadrants(width=32, height=16), 'JPEG', quality=95,
                   exif=exif)
  out = decode_image(data)
  assert_rgb(out, 32, 16)
  for (y, x), colour in zip([(4, 4), (4, 11), (27, 4), (27, 11)], corners):
    np.testing.assert_allclose(out[y, x], colour, atol=12)


def test_upside_down_exif_keeps_the_shape():
  """Orientation 3 (rotated 180 degrees) keeps H x W and swaps corners."""
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = 3
  out = decode_image(fx.encode(fx.quadrants(32, 16), 'JPEG', quality=95,
                               exif=exif))
  assert_rgb(out, 16, 32)
  np.testing.assert_allclose(out[3, 5], WHITE, atol=12)
  np.testing.assert_allclose(out[12, 27], RED, atol=12)


def test_grayscale_becomes_equal_rgb_channels():
  """Mode L: each grey value is repeated in R, G and B."""
  grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
  out = decode_image(fx.encode(Image.fromarray(grey, 'L'), 'PNG'))
  assert_rgb(out, 4, 6)
  for channel in range(3):
    np.testing.assert_array_equal(out[..., channel], grey)


def test_palette_image_is_looked_up():
  """Mode P: indices become their palette colours."""
  image = Image.new('P', (3, 2))
  image.putpalette(list(RED + BLUE + GREEN) + [0] * (768 - 9))
  image.putdata([0, 1, 2, 2, 1, 0])
  data = fx.encode(image, 'PNG')
  assert Image.open(io.BytesIO(data)).mode == 'P'
  out = decode_image(data)
  np.testing.assert_array_equal(out, [[RED, BLUE, GREEN], [GREEN, BLUE, RED]])


def test_palette_transparency_is_composited_onto_white():
  """A palette entry marked transparent becomes white, the rest keep theirs."""
  image = Image.new('P', (2, 1))
  image.putpalette(list(RED + BLUE) + [0] * (768 - 6))
  image.putdata([0, 1])
  out = decode_image(fx.encode(image, 'PNG', transparency=1))
  np.testing.assert_array_equal(out, [[RED, WHITE]])


def test_cmyk_jpeg_becomes_rgb():
  """A CMYK JPEG (Adobe, inverted) decodes to the RGB it means: pure cyan
  ink is (0, 255, 255), no ink is white."""
  image = Image.new('CMYK', (16, 8), (255, 0, 0, 0))
  image.paste((0, 0, 0, 0), (8, 0, 16, 8))
  out = decode_image(fx.encode(image, 'JPEG', quality=95))
  assert_rgb(out, 8, 16)
  np.testing.assert_allclose(out[4, 2], (0, 255, 255), atol=8)
  np.testing.assert_allclose(out[4, 13], WHITE, atol=8)


def test_16_bit_png_is_rescaled_not_clipped():
  """I;16 greys map 0..65535 to 0..255 (clipping at 255 would whiten them)."""
  grey = np.array([[0, 257 * 100], [32768, 65535]], np.uint16)
  image = Image.fromarray(grey)
  assert image.mode == 'I;16'
  data = fx.encode(image, 'PNG')
  assert Image.open(io.BytesIO(data)).mode.startswith('I')
  out = decode_image(data)
  assert_rgb(out, 2, 2)
  np.testing.assert_array_equal(out[..., 0], [[0, 100], [128, 255]])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_rgba_is_composited_onto_white():
  """Fully transparent pixels become white whatever colour they store,
  opaque ones keep theirs, half-transparent black becomes mid-grey."""
  rgba = np.array([[(0, 0, 0, 0), (10, 20, 30, 255)],
                   [(0, 0, 0, 128), (200, 0, 0, 0)]], np.uint8)
  out = decode_image(fx.encode(rgba, 'PNG'))
  assert_rgb(out, 2, 2)
  np.testing.assert_array_equal(out[0, 0], WHITE)
  np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
  np.testing.assert_allclose(out[1, 0], (127, 127, 127), atol=1)
  np.testing.assert_array_equal(out[1, 1], WHITE)


def test_la_is_composited_onto_white():
  """Grey with alpha: transparent becomes white, opaque keeps its grey."""
  image = Image.new('LA', (2, 1))
  image.putdata([(0, 0), (50, 255)])
  out = decode_image(fx.encode(image, 'PNG'))
  np.testing.assert_array_equal(out, [[WHITE, (50, 50, 50)]])


def test_bmp_and_tiff_decode():
  """The other formats the decoder names decode exactly too."""
  pixels = fx.quadrants(12, 8)
  for image_format in ('BMP', 'TIFF'):
    np.testing.assert_array_equal(
        decode_image(fx.encode(pixels, image_format)), pixels)


# Bad inputs.


def test_zero_bytes_is_empty():
  """No bytes at all: reason 'empty'."""
  assert reason_of(b'') == 'empty'


def test_random_bytes_and_text_are_not_images():
  """Noise and a caption mistaken for an image: reason 'not_image'."""
  noise = np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes()
  assert not noise.startswith(b'\xff\xd8')
  assert reason_of(noise) == 'not_image'
  assert reason_of(b'a photo of a red circle on the left\n') == 'not_image'
  assert reason_of(b'<html><body>404 Not Found</body></html>') == 'not_image'


def test_truncated_jpeg_is_truncated():
  """A JPEG cut inside its compressed data, as an interrupted download
  leaves it: reason 'truncated'."""
  data = fx.encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3),
                                                     np.uint8), 'JPEG')
  assert decode_image(data).shape == (32, 32, 3)
  assert reason_of(data[:int(len(data) * 0.8)]) == 'truncated'
  assert reason_of(data[:-2]) == 'truncated'  # Just the end marker gone.


def test_jpeg_cut_inside_its_header_is_not_called_a_non_image():
  """A JPEG cut before its pixel data still starts like a JPEG: reason
  'truncated' or 'corrupt', never 'not_image'."""
  data = fx.encode(fx.quadrants(), 'JPEG')
  scan_start = data.find(b'\xff\xda')
  assert scan_start > 20
  for cut in range(3, scan_start + 2):
    assert reason_of(data[:cut]) in ('truncated', 'corrupt'), cut


def test_header_bomb_is_refused_without_decoding(monkeypatch):
  """A PNG header claiming 100000 x 100000 pixels and holding none is
  refused as 'too_large' from its header: loading pixels is never tried
  (it would have failed as truncated), under our cap and under PIL's."""
  # Decoded for real, such a header's missing pixels are 'truncated'.
  assert reason_of(fx.png_header_only(100, 100)) == 'truncated'

  def no_load(self):
    raise AssertionError('pixels were decoded')
  monkeypatch.setattr(ImageFile.ImageFile, 'load', no_load)
  bomb = fx.png_header_only(100_000, 100_000)
  assert reason_of(bomb, max_pixels=10_000) == 'too_large'
  assert reason_of(bomb) == 'too_large'  # PIL's own limit, 2x its default.
  # Just over a small cap is refused the same way; under it the decoder
  # does go on to load (here: our stub, so AssertionError).
  assert reason_of(fx.png_header_only(101, 100), max_pixels=10_000) == 'too_large'
  with pytest.raises(AssertionError, match='pixels were decoded'):
    decode_image(fx.png_header_only(100, 100), max_pixels=10_000)


def test_real_image_over_the_pixel_cap_is_too_large():
  """A genuine, tiny-on-disk 300 x 200 PNG is refused at max_pixels=50_000
  and decoded at max_pixels=60_000: the cap is on pixels, not bytes."""
  data = fx.encode(np.zeros((200, 300, 3), np.uint8), 'PNG')
  assert len(data) < 5_000
  assert reason_of(data, max_pixels=50_000) == 'too_large'
  assert decode_image(data, max_pixels=60_000).shape == (200, 300, 3)


def test_bad_image_is_a_value_error_with_reason_in_message():
  """BadImage subclasses ValueError and its message starts with the reason."""
  error = BadImage('corrupt', 'bad huffman table')
  assert isinstance(error, ValueError)
  assert error.reason == 'corrupt'
  assert str(error) == 'corrupt: bad huffman table'
  assert str(BadImage('empty')) == 'empty'


# Pillow's TIFF reader warns about the damage it meets; that is expected here.
no_tiff_warnings = pytest.mark.filterwarnings('ignore::UserWarning:PIL')

REASONS = ('empty', 'not_image', 'unsupported', 'too_large', 'truncated', 'corrupt')
_SAMPLE = fx.quadrants(16, 12)
ENCODED = {
    'JPEG': fx.encode(_SAMPLE, 'JPEG'),
    'PNG': fx.encode(_SAMPLE, 'PNG'),
    'WEBP': fx.encode(_SAMPLE, 'WEBP'),
    'GIF': fx.encode(_SAMPLE, 'GIF'),
    'TIFF': fx.encode(_SAMPLE, 'TIFF'),
}


def decoded_or_reason(data, max_pixels=decode.DEFAULT_MAX_PIXELS):
  """The array's shape, or the BadImage reason; any other exception fails."""
  try:
    out = decode_image(data, max_pixels=max_pixels)
  except BadImage as e:
    assert e.reason in REASONS, e
    return e.reason
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  return out.shape


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_bad_image(data):
  """Any bytes at all: an RGB array or a BadImage with a documented reason."""
  decoded_or_reason(data)


@no_tiff_warnings
@settings(max_examples=150, deadline=None)
@given(image_format=st.sampled_from(sorted(ENCODED)), fraction=st.floats(0, 1))
def test_every_prefix_of_an_image_is_decoded_or_bad(image_format, fraction):
  """An image cut anywhere past its 12-byte signature either still decodes
  (the cut fell in trailing metadata) or is 'truncated' or 'corrupt', never
  'not_image' and never another exception."""
  data = ENCODED[image_format]
  cut = 12 + round(fraction * (len(data) - 13))
  assert 12 <= cut < len(data)
  result = decoded_or_reason(data[:cut])
  assert result in ('truncated', 'corrupt', (12, 16, 3)), (cut, result)


@no_tiff_warnings
@settings(max_examples=150, deadline=None)
@given(image_format=st.sampled_from(sorted(ENCODED)),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_damaged_bytes_never_raise_anything_but_bad_image(image_format, flips):
  """Bytes overwritten anywhere in a valid image: an RGB array or a
  BadImage with a documented reason (checked under a small pixel cap, so a
  damaged header's huge size claim is refused, not allocated)."""
  data = bytearray(ENCODED[image_format])
  for position, value in flips:
    data[position % len(data)] = value
  decoded_or_reason(bytes(data), max_pixels=1_000_000)


# SkipCounter.


def test_skip_counter_counts_by_reason():
  """Adding reasons tallies them separately, sorted, with a total; BadImage
  reasons from real decodes count like any other."""
  counter = SkipCounter()
  for data in (b'', b'', b'text', fx.png_header_only(5000, 5000)):
    try:
      decode_image(data, max_pixels=1000)
    except BadImage as e:
      counter.add(e.reason)
  counter.add('unparseable', 3)
  counter.add('corrupt', 0)  # Zero adds nothing, not even the key.
  assert counter.counts == {'empty': 2, 'not_image': 1, 'too_large': 1,
                            'unparseable': 3}
  assert list(counter.counts) == sorted(counter.counts)
  assert counter.total == 7
  assert counter.as_dict('skipped/') == {
      'skipped/empty': 2, 'skipped/not_image': 1, 'skipped/too_large': 1,
      'skipped/unparseable': 3}


def test_skip_counter_merges_restores_and_rejects_negatives():
  """merge adds counts; SkipCounter(as_dict()) restores an equal counter;
  a negative count is a ValueError naming the reason."""
  a = SkipCounter({'empty': 1, 'corrupt': 2})
  b = SkipCounter({'corrupt': 5, 'truncated': 1})
  assert a.merge(b) is a
  assert a.counts == {'corrupt': 7, 'empty': 1, 'truncated': 1}
  assert b.counts == {'corrupt': 5, 'truncated': 1}
  restored = SkipCounter(a.as_dict())
  assert restored == a and restored is not a
  assert restored != b and restored != a.counts
  with pytest.raises(ValueError, match='truncated'):
    a.add('truncated', -1)
  assert a.counts['truncated'] == 1
  assert 'corrupt' in repr(a)
