"""Writers of small real data files for the data tests: encoded images,
TFRecord shards (img2dataset layout), webdataset tar shards, PNG headers;
and the batch comparisons the pipeline tests share."""

import io
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def encode(image, image_format: str = 'PNG', **save_kwargs) -> bytes:
  """A PIL image (or uint8 array) encoded as `image_format` bytes."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **save_kwargs)
  return buffer.getvalue()


def solid(colour, width: int = 8, height: int = 6) -> np.ndarray:
  """A uint8 [height, width, 3] image of one colour."""
  return np.broadcast_to(np.asarray(colour, np.uint8),
                         (height, width, 3)).copy()


def quadrants(width: int = 32, height: int = 16) -> np.ndarray:
  """Red top-left, green top-right, blue bottom-left, white bottom-right.

  Large flat blocks survive JPEG, and no rotation or flip maps the layout
  onto itself, so where each colour lands says which transform ran.
  """
  a = np.zeros((height, width, 3), np.uint8)
  h, w = height // 2, width // 2
  a[:h, :w] = (255, 0, 0)
  a[:h, w:] = (0, 255, 0)
  a[h:, :w] = (0, 0, 255)
  a[h:, w:] = (255, 255, 255)
  return a


def png_header_only(width: int, height: int) -> bytes:
  """A valid PNG header claiming width x height RGB pixels, holding almost
  none: an IDAT chunk with an empty zlib stream, then IEND.

  Anything that tried to decode its pixels would fail (too little data),
  so a 'too_large' verdict proves the size was judged from the header alone.
  """
  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack('>I', len(body)) + kind + body
            + struct.pack('>I', zlib.crc32(kind + body) & 0xFFFFFFFF))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB.
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
          + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def make_example(features: dict) -> bytes:
  """A serialised tf.train.Example with one bytes value per feature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  feature = {
      name: tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[value.encode() if isinstance(value, str) else value]))
      for name, value in features.items()}
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path, payloads) -> str:
  """Writes serialised records (bytes) with tf.io.TFRecordWriter."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  with tf.io.TFRecordWriter(path) as writer:
    for payload in payloads:
      writer.write(payload)
  return path


def write_tar(path, members) -> str:
  """Writes an uncompressed tar of (member name, bytes) in the given order."""
  path = os.fspath(path)
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def assert_same_batches(left, right):
  assert len(left) == len(right)
  for a, b in zip(left, right):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
