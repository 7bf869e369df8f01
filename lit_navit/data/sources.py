"""Data sources: random access to (image bytes, caption) records.

Every source is indexable, so an iterator over it is fully described by
positions (seed, step) and can be saved and restored exactly. Sources only
read bytes: decoding and its failures belong to `decode.py`.

A record that a source cannot read (an unparseable TFRecord entry, a missing
image file) still comes back, with `image=b''` and `error` naming why, so the
pipeline skips and counts it like any other bad image. Damage found while
indexing (a truncated shard tail, a tar key without an image) is counted in
the source's `skipped` dict, reason -> count.

Records may carry boxes with region texts (`boxes.Region`, for LocCa's box
tasks), normalised to the stored pixels (EXIF orientation ignored): the
synthetic source always, TFRecords from two features (`box_key`,
`box_text_key`), JSONL file lists from two fields of a row (`box_field`,
`box_text_field`). Bad box data (counts that do not match,
coordinates outside [0, 1], ymin > ymax, an empty text) drops that record's
boxes, never the record: it keeps its image and caption, no boxes, and
`box_error` says why, for the pipeline to count. A record without the
features simply has no boxes. Tar shards and CSV/TSV lists carry none.
"""

import csv
import dataclasses
import json
import logging
import operator
import os
import re
import struct
import tarfile
from typing import Protocol, Sequence

import ml_collections
import numpy as np

from lit_navit import fs
from lit_navit.data import boxes as boxes_lib

SOURCE_KINDS = ('synthetic', 'tfrecord', 'wds', 'files')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


@dataclasses.dataclass(frozen=True)
class Record:
  """One example as stored: encoded image bytes and its caption."""
  index: int    # Stable example index within the source, 0..len-1.
  image: bytes  # Encoded image; may be corrupt, decoding is not our job.
  caption: str
  key: str      # Human-readable id: file path, tar path:key, tfrecord path#n.
  error: str = ''  # Why `image` is b'' when the source could not read it.
  boxes: tuple = ()  # boxes.Region of the image, if the source has any.
  box_error: str = ''  # Why the stored boxes were dropped (bad box data).


class Source(Protocol):
  """Random access to records."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Record:
    ...


def host_shard(num_examples: int, process_index: int, process_count: int) -> range:
  """The contiguous block of example indices that one host reads.

  Blocks are disjoint, cover 0..num_examples-1 together, and differ in size
  by at most one.
  """
  if process_count < 1:
    raise ValueError(f'process_count must be >= 1, got {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index {process_index} not in [0, {process_count})')
  if num_examples < 0:
    raise ValueError(f'num_examples must be >= 0, got {num_examples}')
  start = process_index * num_examples // process_count
  stop = (process_index + 1) * num_examples // process_count
  return range(start, stop)


def expand_paths(pattern_or_paths) -> list[str]:
  """Expands globs, `{000..099}` ranges and comma-separated lists to files.

  Raises:
    FileNotFoundError: naming the first pattern that matches no file, or a
      file that a range or list names and that does not exist (a missing
      shard of 'x-{000..099}' is an error, not quietly left out).
  """
  if isinstance(pattern_or_paths, (str, os.PathLike)):
    patterns = [p.strip() for p in os.fspath(pattern_or_paths).split(',')]
  else:
    patterns = [os.fspath(p) for p in pattern_or_paths]
  paths = []
  for pattern in patterns:
    if not pattern:
      continue
    bucket = fs.missing_bucket(pattern)
    if bucket:  # else a glob there fails naming only the API's path
      raise FileNotFoundError(f'data path {pattern!r}: bucket {bucket} does not exist')
    matched = []
    for expanded in _expand_braces(pattern):
      if _has_magic(expanded):
        matched.extend(fs.glob(expanded))
      elif fs.isfile(expanded):
        matched.append(expanded)
      elif fs.isdir(expanded):
        raise IsADirectoryError(f'data path {expanded!r} is a folder: name its '
                                f'files, e.g. {fs.join(expanded, "*.tfrecord")}')
      else:
        raise FileNotFoundError(f'data file {expanded!r} not found'
                                + (f' (from {pattern!r})'
                                   if expanded != pattern else ''))
    if not matched:
      raise FileNotFoundError(f'no data file matches {pattern!r}')
    paths.extend(matched)
  if not paths:
    raise FileNotFoundError(f'no data path given: {pattern_or_paths!r}')
  return paths


def _has_magic(pattern: str) -> bool:
  return any(c in pattern for c in '*?[')


_BRACE_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')


def _expand_braces(pattern: str) -> list[str]:
  """'shard-{00..02}.tar' -> shard-00.tar, shard-01.tar, shard-02.tar."""
  match = _BRACE_RANGE.search(pattern)
  if not match:
    return [pattern]
  first, last = match.groups()
  width = len(first)
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded
          for i in range(int(first), int(last) + 1)
          for expanded in _expand_braces(f'{head}{i:0{width}d}{tail}')]


def _as_text(data: bytes) -> str:
  return data.decode('utf-8', errors='replace').strip()


class _OffsetIndex:
  """Where each record's bytes lie: (file, offset, size) in compact arrays.

  Web-scale sources hold millions of records per host; numpy arrays keep the
  index to ~20 bytes a record where Python tuples would take ~100.
  """

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._columns = ([], [], [])  # file id, offset, size
    self._arrays = None

  def add(self, file_id: int, offset: int, size: int):
    for column, value in zip(self._columns, (file_id, offset, size)):
      column.append(value)

  def freeze(self):
    """Turns the growing lists into arrays once indexing is done."""
    file_ids, offsets, sizes = self._columns
    self._arrays = (np.asarray(file_ids, np.int32),
                    np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))
    self._columns = None

  def __len__(self):
    return len(self._arrays[0])

  def file_id(self, index: int) -> int:
    return int(self._arrays[0][index])

  def read(self, index: int) -> bytes:
    file_ids, offsets, sizes = self._arrays
    with fs.open(self.paths[file_ids[index]], 'rb') as f:
      f.seek(int(offsets[index]))
      return f.read(int(sizes[index]))


def check_index(index: int, length: int) -> int:
  """`index` as an int; IndexError unless 0 <= index < length."""
  index = operator.index(index)
  if not 0 <= index < length:
    raise IndexError(f'index {index} out of range for {length} records')
  return index


# TFRecord framing: uint64 length, uint32 masked crc32c of the length, data,
# uint32 masked crc32c of the data.
_TFRECORD_HEADER = 12
_TFRECORD_FOOTER = 4


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordSource:
  """tf.train.Example records in TFRecord files, WebLI / img2dataset style.

  The offsets of all records are indexed once by walking the length headers
  (whose CRC is checked, so a damaged header cannot send the walk astray).
  A shard's damaged or truncated tail is counted in `skipped` and the records
  before it are kept. A record whose payload fails to parse, or that lacks
  the image feature, reads as `image=b''` with `error` set; a missing caption
  reads as ''. Boxes: see `example_record`.
  """

  def __init__(self, pattern_or_paths, image_key='jpg', caption_key='txt',
               key_key='key', box_key='', box_text_key=''):
    self.paths = expand_paths(pattern_or_paths)
    self.image_key, self.caption_key, self.key_key = image_key, caption_key, key_key
    self.box_key, self.box_text_key = box_key, box_text_key
    self.skipped = {}
    self._index = _OffsetIndex(self.paths)
    self._record_numbers = []  # Position of each record within its file.
    for file_id, path in enumerate(self.paths):
      self._index_file(file_id, path)
    self._index.freeze()
    self._record_numbers = np.asarray(self._record_numbers, np.int64)
    # Imported here: tensorflow takes seconds to import and only this
    # source needs it.
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    self._example_cls = example_pb2.Example

  def _index_file(self, file_id: int, path: str):
    file_size = fs.size(path)
    with fs.open(path, 'rb') as f:
      offset, n = 0, 0
      while offset < file_size:
        header = f.read(_TFRECORD_HEADER)
        if len(header) < _TFRECORD_HEADER:
          self._skip('truncated', path, offset, 'partial length header')
          return
        length, length_crc = struct.unpack('<QI', header)
        if _masked_crc32c(header[:8]) != length_crc:
          self._skip('corrupt_header', path, offset,
                     'length checksum mismatch; rest of the file unreadable')
          return
        end = offset + _TFRECORD_HEADER + length + _TFRECORD_FOOTER
        if end > file_size:
          self._skip('truncated', path, offset,
                     f'record of {length} bytes runs past the end of file')
          return
        self._index.add(file_id, offset + _TFRECORD_HEADER, length)
        self._record_numbers.append(n)
        offset, n = end, n + 1
        f.seek(offset)

  def _skip(self, reason: str, path: str, offset: int, detail: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    logging.warning('TFRecord %s at byte %d: %s (%s)', path, offset, detail, reason)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> Record:
    index = check_index(index, len(self))
    path = self._index.paths[self._index.file_id(index)]
    return example_record(
        self._example_cls, self._index.read(index), index,
        f'{path}#{self._record_numbers[index]}', image_key=self.image_key,
        caption_key=self.caption_key, key_key=self.key_key,
        box_key=self.box_key, box_text_key=self.box_text_key)


def example_record(example_cls, payload: bytes, index: int, name: str, *,
                   image_key: str, caption_key: str, key_key: str,
                   box_key: str = '', box_text_key: str = '') -> Record:
  """The Record a serialised tf.train.Example holds (`error` set if none).

  Boxes (TFDS 'objects/bbox' style): `box_key` a float list of 4n
  normalised coordinates (ymin, xmin, ymax, xmax per box), `box_text_key`
  a bytes list of the n region texts; '' reads none. Bad box data sets
  `box_error` and drops the boxes alone.
  """
  try:
    example = example_cls.FromString(payload)
  except Exception as e:  # pylint: disable=broad-except
    # protobuf's DecodeError class differs between its implementations.
    return Record(index, b'', '', name, error=f'unparseable: {e}')
  features = example.features.feature
  key = _as_text(_first_bytes(features, key_key))
  name = f'{name}:{key}' if key else name
  image = _first_bytes(features, image_key)
  caption = _as_text(_first_bytes(features, caption_key))
  if not image:
    return Record(index, b'', caption, name, error=f'no {image_key!r} feature')
  try:
    regions = _example_regions(features, box_key, box_text_key)
  except ValueError as e:
    return Record(index, image, caption, name, box_error=f'bad_boxes: {e}')
  return Record(index, image, caption, name, boxes=regions)


def _example_regions(features, box_key: str, box_text_key: str) -> tuple:
  """The regions of an Example's box features; () when it has neither."""
  if not box_key or not box_text_key or (
      box_key not in features and box_text_key not in features):
    return ()
  coordinates, texts = [], []
  if box_key in features:
    if features[box_key].WhichOneof('kind') not in ('float_list', None):
      raise ValueError(f'{box_key!r} is not a float list')
    coordinates = features[box_key].float_list.value
  if box_text_key in features:
    if features[box_text_key].WhichOneof('kind') not in ('bytes_list', None):
      raise ValueError(f'{box_text_key!r} is not a bytes list')
    texts = [_as_text(t) for t in features[box_text_key].bytes_list.value]
  return boxes_lib.parse_regions(coordinates, texts)


def row_regions(row: dict, box_field: str, box_text_field: str):
  """(regions, box_error) of a JSONL row: `box_field` a list of
  [ymin, xmin, ymax, xmax] (or a flat list of 4n numbers), `box_text_field`
  a list of the n texts; no regions and no error when the row has neither
  (or the names are '')."""
  if not box_field or not box_text_field or (
      box_field not in row and box_text_field not in row):
    return (), ''
  texts = row.get(box_text_field, [])
  try:
    if not isinstance(texts, list):
      raise ValueError(f'{box_text_field!r} is not a list')
    return boxes_lib.parse_regions(row.get(box_field, []), texts), ''
  except (ValueError, TypeError) as e:  # numpy's, for what is not numbers
    return (), f'bad_boxes: {e}'


def _first_bytes(features, key: str) -> bytes:
  if key not in features:
    return b''
  values = features[key].bytes_list.value
  return values[0] if values else b''


def tar_member_key(member: tarfile.TarInfo):
  """(key, lower-case extension) of a webdataset tar member, or (None, None)
  for one that belongs to no record: not a file, no extension, hidden
  (.DS_Store, ._x). The key is the member path up to its name's first dot."""
  if not member.isfile():
    return None, None
  folder, name = os.path.split(member.name)
  stem, dot, extension = name.partition('.')
  if not dot or not stem:
    return None, None
  return os.path.join(folder, stem), extension.lower()


class WebDatasetSource:
  """Tar shards as img2dataset writes them: KEY.jpg (.jpeg/.png/.webp),
  KEY.txt, optionally KEY.json.

  Members are grouped by key, the member path up to the first dot of its
  file name. Each member's data offset is indexed once. A key without an
  image or without a caption is skipped and counted in `skipped`, as is a
  shard whose tail is damaged (the members before it are kept).
  """

  def __init__(self, pattern_or_paths):
    self.paths = expand_paths(pattern_or_paths)
    self.skipped = {}
    self._images = _OffsetIndex(self.paths)
    self._captions = _OffsetIndex(self.paths)
    self._keys = []
    for file_id, path in enumerate(self.paths):
      self._index_shard(file_id, path)
    self._images.freeze()
    self._captions.freeze()

  def _index_shard(self, file_id: int, path: str):
    file_size = fs.size(path)
    groups = {}  # key -> {extension: (offset, size)}, in first-seen order.
    try:
      with fs.open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
        for member in tar:
          key, extension = tar_member_key(member)
          if key is None:
            continue
          if member.offset_data + member.size > file_size:
            self._skip('truncated', path, member.name)
            break
          groups.setdefault(key, {})[extension] = (
              member.offset_data, member.size)
        else:
          # tarfile ends its walk quietly at a cut-short or damaged header,
          # or at the end of the file; a complete tar ends in zero blocks.
          tar.fileobj.seek(tar.offset)
          block = tar.fileobj.read(tarfile.BLOCKSIZE)
          if not block or block.strip(b'\0'):
            self._skip('truncated' if len(block) < tarfile.BLOCKSIZE
                       else 'corrupt_shard', path,
                       f'no end-of-archive marker or a damaged header at '
                       f'byte {tar.offset}; members from there on')
    except tarfile.ReadError as e:
      if file_size < tarfile.BLOCKSIZE:  # Not even one whole header.
        self._skip('truncated', path, f'{file_size} bytes ({e})')
      elif not groups:
        raise ValueError(
            f'{path}: not an uncompressed tar file ({e}); compressed shards '
            'cannot be read by offset') from e
      else:
        self._skip('corrupt_shard', path, str(e))
    for key, members in groups.items():
      image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
      if image is None:
        self._skip('no_image', path, key)
      elif 'txt' not in members:
        self._skip('no_caption', path, key)
      else:
        self._images.add(file_id, *image)
        self._captions.add(file_id, *members['txt'])
        self._keys.append(key)

  def _skip(self, reason: str, path: str, detail: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    logging.warning('tar %s: skipped %s (%s)', path, detail, reason)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> Record:
    index = check_index(index, len(self))
    path = self.paths[self._images.file_id(index)]
    return Record(index, self._images.read(index),
                  _as_text(self._captions.read(index)),
                  f'{path}:{self._keys[index]}')


class FileListSource:
  """Image files listed in JSONL ({"image": path, "caption": text} per line)
  or CSV/TSV with a header row.

  The format follows the extension (.jsonl/.json, .csv, .tsv). Relative image
  paths resolve against `root`, or else the list's own folder. Lines that do
  not parse or lack a field are skipped and counted in `skipped`. Image files
  are opened only when read; one that is missing then reads as `image=b''`
  with `error` set. JSONL rows may hold boxes (`row_regions`).
  """

  def __init__(self, path, image_field='image', caption_field='caption',
               root=None, box_field='', box_text_field=''):
    path = os.fspath(path)
    if not fs.isfile(path):
      raise FileNotFoundError(f'file list not found: {path}')
    self.path = path
    self.root = os.fspath(root) if root else fs.dirname(fs.absolute(path))
    if not fs.isdir(self.root):
      raise FileNotFoundError(f'image root folder not found: {self.root}')
    self.image_field, self.caption_field = image_field, caption_field
    self.box_fields = (box_field, box_text_field)
    self.skipped = {}
    self._items = []  # (image path, caption, line number, (regions, box_error))
    extension = os.path.splitext(path)[1].lower()
    if extension in ('.jsonl', '.json'):
      self._read_jsonl()
    elif extension in ('.csv', '.tsv'):
      self._read_csv(delimiter='\t' if extension == '.tsv' else ',')
    else:
      raise ValueError(f'{path}: unknown file list format {extension!r}; '
                       'expected .jsonl, .json, .csv or .tsv')

  def _read_jsonl(self):
    with fs.open(self.path, 'r', encoding='utf-8', errors='replace') as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          self._skip('bad_line', line_number, str(e))
          continue
        if not isinstance(row, dict):
          self._skip('bad_line', line_number, 'not a JSON object')
          continue
        self._add(row, line_number, row_regions(row, *self.box_fields))

  def _read_csv(self, delimiter: str):
    with fs.open(self.path, 'r', encoding='utf-8', errors='replace', newline='') as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      for field in (self.image_field, self.caption_field):
        if field not in (reader.fieldnames or ()):
          raise ValueError(f'{self.path}: header {reader.fieldnames} has no '
                           f'column {field!r}')
      for row in reader:
        self._add(row, reader.line_num)

  def _add(self, row: dict, line_number: int, regions=((), '')):
    image, caption = row.get(self.image_field), row.get(self.caption_field)
    if not isinstance(image, str) or not image:
      self._skip('no_image', line_number, f'no {self.image_field!r} field')
    elif not isinstance(caption, str):
      self._skip('no_caption', line_number, f'no {self.caption_field!r} field')
    else:
      self._items.append((fs.join(self.root, image), caption.strip(),
                          line_number, regions))

  def _skip(self, reason: str, line_number: int, detail: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    logging.warning('%s line %d: skipped, %s (%s)', self.path, line_number,
                    detail, reason)

  def __len__(self) -> int:
    return len(self._items)

  @property
  def image_paths(self) -> list:
    """The image file of each record (what an export keys records by)."""
    return [image_path for image_path, *_ in self._items]

  def __getitem__(self, index: int) -> Record:
    index = check_index(index, len(self))
    image_path, caption, _, (regions, box_error) = self._items[index]
    try:
      with fs.open(image_path, 'rb') as f:
        image = f.read()
    except OSError as e:
      return Record(index, b'', caption, image_path,
                    error=f'unreadable: {e.strerror or e}')
    return Record(index, image, caption, image_path, boxes=regions,
                  box_error=box_error)


def default_source_config() -> ml_collections.ConfigDict:
  """The keys `make_source` reads. Each kind reads only its own keys."""
  config = ml_collections.ConfigDict()
  config.kind = 'synthetic'  # One of SOURCE_KINDS.
  # tfrecord and wds: files, globs, '{000..099}' ranges, comma-separated.
  # files: the .jsonl/.csv/.tsv list.
  config.path = ''
  # synthetic
  config.size = 10_000
  config.seed = 0
  config.split = 'train'
  config.image_format = 'jpeg'
  config.min_side = 32
  config.max_side = 512
  config.max_aspect = 4.0
  config.object_scale = 1.0  # < 1: small objects, resolution matters
  # tfrecord: tf.train.Example feature names (img2dataset's defaults).
  config.image_key = 'jpg'
  config.caption_key = 'txt'
  config.key_key = 'key'
  # tfrecord: the box features of LocCa's box tasks (TFDS style; the
  # pipeline uses them only with input.box_tasks): a float list of 4n
  # coordinates (ymin, xmin, ymax, xmax per box, normalised to the stored
  # pixels) and a bytes list of the n region texts.
  config.box_key = 'objects/bbox'
  config.box_text_key = 'objects/text'
  # files: field (column) names and the folder relative paths resolve
  # against ('' = the list's folder).
  config.image_field = 'image'
  config.caption_field = 'caption'
  # files (JSONL only): a row's boxes, a list of [ymin, xmin, ymax, xmax]
  # normalised, and their texts, as box_key and box_text_key.
  config.box_field = 'boxes'
  config.box_text_field = 'box_texts'
  config.root = ''
  return config


def box_keys(config: ml_collections.ConfigDict) -> dict:
  """The TFRecord box feature names of a source config; ValueError naming
  the key (relative to the source config) when one is unusable."""
  return _box_names(config, 'box_key', 'box_text_key')


def box_fields(config: ml_collections.ConfigDict) -> dict:
  """The JSONL box field names of a source config, checked as `box_keys`."""
  return _box_names(config, 'box_field', 'box_text_field')


def _box_names(config, box: str, text: str) -> dict:
  names = {box: config.get(box, ''), text: config.get(text, '')}
  for key, value in names.items():
    if not isinstance(value, str):
      raise ValueError(f'{key} = {value!r}: expected a name (a string)')
  if bool(names[box]) != bool(names[text]):
    raise ValueError(f'{box} = {names[box]!r} with {text} = {names[text]!r}: '
                     'set both (boxes need their texts) or neither')
  return names


def make_source(config: ml_collections.ConfigDict) -> Source:
  """Builds the source that `config.kind` names (see default_source_config).

  Raises:
    ValueError: for an unknown kind.
    FileNotFoundError: naming a data path that does not exist.
  """
  kind = config.kind
  if kind == 'synthetic':
    from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.SyntheticSource(
        size=config.size, seed=config.seed, split=config.split,
        image_format=config.image_format, min_side=config.min_side,
        max_side=config.max_side, max_aspect=config.max_aspect,
        object_scale=config.object_scale)
  if kind not in SOURCE_KINDS:
    raise ValueError(f'unknown data source kind {kind!r} (config key '
                     f'"kind"); expected one of {SOURCE_KINDS}')
  if not config.path:
    raise FileNotFoundError(f'data source kind {kind!r} needs config key '
                            '"path", which is empty')
  if kind == 'tfrecord':
    return TFRecordSource(config.path, image_key=config.image_key,
                          caption_key=config.caption_key,
                          key_key=config.key_key, **box_keys(config))
  if kind == 'wds':
    return WebDatasetSource(config.path)
  return FileListSource(config.path, image_field=config.image_field,
                        caption_field=config.caption_field,
                        root=config.root or None, **box_fields(config))
