"""Sequential readers of data files, one per format, for streaming training.

A reader knows one format and a list of files (`paths`, numbered by their
place in it). `records(file, position, record_number)` reads one file front
to back from byte `position`, with large sequential reads, and yields
(position, next_position, Record) for each record; `read_at` reads the one
record at a saved position (a shuffle buffer's reference). Nothing indexes a
whole file or data set.

Example ids: a record's `index` is `example_id(file, record_number)` =
file * 2**32 + record_number, its number within the file counted from 0; the
same record gets the same id on every host and in every epoch. The
`IndexedReader` over a random-access source keeps the source's own indices.

Damage is not an exception: a record that cannot be read comes back as a
Record with `image=b''` and `error` ('reason: detail'), as `sources.py`
does, so the pipeline skips and counts it; a damaged or truncated tail ends
the file with one such record, whose next_position is `END`. Storage errors
(OSError) propagate to the caller, who retries (see `streaming.py`).

Boxes (`Record.boxes`, for LocCa's box tasks): TFRecords read them from
their box features as `sources.example_record` does, JSONL lists from a
row's fields (`sources.row_regions`); tar shards and CSV/TSV lists carry
none.
"""

import contextlib
import csv
import json
import os
import tarfile

import ml_collections

from lit_navit import fs
from lit_navit.data import retry
from lit_navit.data import shards
from lit_navit.data import sources
# The TFRecord framing and record parsing are those of the random-access
# sources, shared rather than copied.
from lit_navit.data.sources import _TFRECORD_FOOTER
from lit_navit.data.sources import _TFRECORD_HEADER
from lit_navit.data.sources import _as_text
from lit_navit.data.sources import _masked_crc32c
from lit_navit.data.sources import IMAGE_EXTENSIONS
from lit_navit.data.sources import Record

# Bytes fetched per storage read while streaming a file, and for the single
# record that `read_at` wants: a restore re-reads every buffered record
# (thousands a host), so that read is about one web image, not a stream block.
STREAM_BLOCK = 8 << 20
RECORD_BLOCK = 256 << 10
_RECORDS_PER_FILE = 1 << 32
# The next_position of a record after which the file cannot be read on.
END = -1


def example_id(file_number: int, record_number: int) -> int:
  """The stable id of record `record_number` of file `file_number`."""
  if not 0 <= record_number < _RECORDS_PER_FILE:
    raise ValueError(f'record number {record_number} does not fit 32 bits')
  return file_number * _RECORDS_PER_FILE + record_number


def open_file(path: str, block_size: int = STREAM_BLOCK):
  """`path` opened for reading through a buffer of `block_size` bytes.

  On object storage a file being streamed fetches its next block in the
  background while this one is parsed (one block ahead), so the latency of
  each request overlaps the work instead of adding to it.
  """
  if not fs.is_remote(path):
    return fs.open(path, 'rb', buffering=block_size)
  filesystem, stripped = fs.filesystem(path)
  if block_size < STREAM_BLOCK:  # One record (`read_at`): nothing to read ahead.
    return filesystem.open(stripped, 'rb', block_size=block_size,
                           cache_type='readahead')
  return filesystem.open(stripped, 'rb', block_size=block_size,
                         cache_type='background', cache_options={'maxblocks': 2})


def _error(index: int, key: str, reason: str, detail: str,
           caption: str = '') -> Record:
  return Record(index, b'', caption, key, error=f'{reason}: {detail}')


class Reader:
  """What every reader shares: the files and `read_at`."""

  def __init__(self, paths):
    self.paths = list(paths)

  def records(self, file_number: int, position: int = 0,
              record_number: int = 0, block_size: int = STREAM_BLOCK):
    raise NotImplementedError

  def read_at(self, file_number: int, position: int,
              record_number: int) -> Record:
    """The record at `position` (a `records` position) of file `file_number`."""
    with contextlib.closing(self.records(file_number, position, record_number,
                                         RECORD_BLOCK)) as records:
      for _, _, record in records:
        return record
    raise ValueError(f'{self.paths[file_number]} holds no record at byte '
                     f'{position}: has the file changed?')


class TFRecordReader(Reader):
  """tf.train.Example records in TFRecord files (see sources.TFRecordSource).

  A length header whose checksum fails, or a record cut short, ends the
  file with one 'corrupt_header' or 'truncated' record.
  """

  def __init__(self, paths, image_key='jpg', caption_key='txt', key_key='key',
               box_key='', box_text_key=''):
    super().__init__(paths)
    self._keys = dict(image_key=image_key, caption_key=caption_key,
                      key_key=key_key, box_key=box_key,
                      box_text_key=box_text_key)
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    self._example_cls = example_pb2.Example

  def records(self, file_number, position=0, record_number=0,
              block_size=STREAM_BLOCK):
    path = self.paths[file_number]
    with open_file(path, block_size) as f:
      f.seek(position)
      while True:
        index = example_id(file_number, record_number)
        name = f'{path}#{record_number}'
        header = f.read(_TFRECORD_HEADER)
        if not header:
          return
        if len(header) < _TFRECORD_HEADER:
          yield position, END, _error(
              index, name, 'truncated', f'partial length header at byte {position}')
          return
        length = int.from_bytes(header[:8], 'little')
        if _masked_crc32c(header[:8]) != int.from_bytes(header[8:], 'little'):
          yield position, END, _error(
              index, name, 'corrupt_header',
              f'length checksum mismatch at byte {position}; rest of the file '
              'unreadable')
          return
        payload = f.read(length + _TFRECORD_FOOTER)
        if len(payload) < length + _TFRECORD_FOOTER:
          yield position, END, _error(
              index, name, 'truncated', f'record of {length} bytes at byte '
              f'{position} runs past the end of file')
          return
        next_position = position + _TFRECORD_HEADER + len(payload)
        yield position, next_position, sources.example_record(
            self._example_cls, payload[:length], index, name, **self._keys)
        position, record_number = next_position, record_number + 1


class TarReader(Reader):
  """webdataset tar shards (see sources.WebDatasetSource), read as a stream.

  A record is a run of consecutive members sharing a key (the member path up
  to the first dot of its name), as webdataset writes them; its position is
  the byte offset of its first member's header. A key without an image or a
  caption reads as a 'no_image' / 'no_caption' record; a member cut short,
  a damaged header or a missing end-of-archive marker ends the file with a
  'truncated' or 'corrupt_shard' record.
  """

  _WANTED = frozenset(IMAGE_EXTENSIONS) | {'txt'}

  def records(self, file_number, position=0, record_number=0,
              block_size=STREAM_BLOCK):
    path = self.paths[file_number]
    counter = [record_number]

    def emit(start, end, key, members):
      index = example_id(file_number, counter[0])
      counter[0] += 1
      return start, end, _group_record(index, f'{path}:{key}', members)

    def damage(at, reason, detail):
      index = example_id(file_number, counter[0])
      return at, END, _error(index, f'{path}@{at}', reason, detail)

    with open_file(path, block_size) as f:
      f.seek(position)
      try:
        tar = tarfile.open(fileobj=f, mode='r:')
      except tarfile.ReadError as e:
        yield damage(position, 'corrupt_shard', f'not an uncompressed tar ({e})')
        return
      key, start, members = None, position, {}
      while True:
        try:
          member = tar.next()
        except tarfile.ReadError as e:
          member, failure = None, str(e)
        else:
          failure = None
        tar.members.clear()  # tarfile keeps every header read; we need none.
        if member is None:
          break
        member_key, extension = sources.tar_member_key(member)
        if member_key is None:
          continue
        if member_key != key:
          if key is not None:
            yield emit(start, member.offset, key, members)
          key, start, members = member_key, member.offset, {}
        if extension in self._WANTED:
          f.seek(member.offset_data)
          data = f.read(member.size)
          if len(data) < member.size:
            if key is not None and members:
              yield emit(start, member.offset, key, members)
            yield damage(member.offset, 'truncated',
                         f'member {member.name} runs past the end of file')
            return
          members[extension] = data
      end = tar.offset
      if key is not None:
        yield emit(start, end, key, members)
      # tarfile ends its walk quietly at a damaged header or at the end of
      # the file; a complete tar ends in a zero block.
      f.seek(end)
      block = f.read(tarfile.BLOCKSIZE)
      if failure or not block or block.strip(b'\0'):
        reason = ('truncated' if len(block) < tarfile.BLOCKSIZE
                  else 'corrupt_shard')
        yield damage(end, reason, failure or f'no end-of-archive marker or a '
                     f'damaged header at byte {end}; members from there on')


def _group_record(index: int, key: str, members: dict) -> Record:
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    return _error(index, key, 'no_image', 'no image member')
  if 'txt' not in members:
    return _error(index, key, 'no_caption', 'no .txt member')
  caption = _as_text(members['txt'])
  if not image:
    return _error(index, key, 'no_image', 'empty image member', caption)
  return Record(index, image, caption, key)


class ListReader(Reader):
  """Image files listed in JSONL, CSV or TSV files (see sources.FileListSource).

  A record is one line (CSV and TSV: after the header row; a quoted field
  may not span lines here); its position is the line's byte offset. Image
  files are read as their records are, with `retry_policy` for transient
  storage errors; a missing one reads as an 'unreadable' record, a line that
  does not parse or lacks a field as 'bad_line', 'no_image' or 'no_caption'.
  """

  def __init__(self, paths, image_field='image', caption_field='caption',
               root=None, retry_policy=retry.RetryPolicy(), box_field='',
               box_text_field=''):
    super().__init__(paths)
    self.image_field, self.caption_field = image_field, caption_field
    self.box_fields = (box_field, box_text_field)
    self.root = os.fspath(root) if root else None
    self._retry = retry_policy
    for path in self.paths:
      _list_format(path)  # Unknown formats fail now, naming the file.

  def records(self, file_number, position=0, record_number=0,
              block_size=STREAM_BLOCK):
    path = self.paths[file_number]
    delimiter = _list_format(path)
    root = self.root or fs.dirname(fs.absolute(path))
    with open_file(path, block_size) as f:
      header = None
      if delimiter:
        header_line = f.readline()
        header = next(csv.reader([_as_line(header_line)], delimiter=delimiter),
                      [])
        for field in (self.image_field, self.caption_field):
          if field not in header:
            raise ValueError(f'{path}: header {header} has no column {field!r}')
        position = max(position, len(header_line))
      f.seek(position)
      for line in iter(f.readline, b''):
        next_position = position + len(line)
        if line.strip():
          index = example_id(file_number, record_number)
          yield position, next_position, self._record(
              index, f'{path}:{position}', _as_line(line), header, delimiter,
              root)
          record_number += 1
        position = next_position

  def _record(self, index, name, line, header, delimiter, root) -> Record:
    regions = ((), '')
    if delimiter:
      row = dict(zip(header, next(csv.reader([line], delimiter=delimiter), [])))
    else:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        return _error(index, name, 'bad_line', str(e))
      if not isinstance(row, dict):
        return _error(index, name, 'bad_line', 'not a JSON object')
      regions = sources.row_regions(row, *self.box_fields)
    image, caption = row.get(self.image_field), row.get(self.caption_field)
    if not isinstance(image, str) or not image:
      return _error(index, name, 'no_image', f'no {self.image_field!r} field')
    if not isinstance(caption, str):
      return _error(index, name, 'no_caption', f'no {self.caption_field!r} field')
    image_path = fs.join(root, image)
    try:
      data = retry.call(lambda: fs.read_bytes(image_path), self._retry,
                        image_path)
    except OSError as e:
      return _error(index, image_path, 'unreadable', e.strerror or str(e),
                    caption.strip())
    return Record(index, data, caption.strip(), image_path, boxes=regions[0],
                  box_error=regions[1])


def _as_line(data: bytes) -> str:
  return data.decode('utf-8', errors='replace').rstrip('\r\n')


def _list_format(path: str) -> str:
  """'' for JSONL, else the CSV delimiter; ValueError for other files."""
  extension = os.path.splitext(path)[1].lower()
  if extension in ('.jsonl', '.json'):
    return ''
  if extension in ('.csv', '.tsv'):
    return '\t' if extension == '.tsv' else ','
  raise ValueError(f'{path}: unknown file list format {extension!r}; '
                   'expected .jsonl, .json, .csv or .tsv')


class IndexedReader(Reader):
  """A random-access source (synthetic, or any `sources.Source`) read as
  virtual files of `records_per_file` consecutive records.

  Positions and example ids are the source's own indices, so `index` in a
  batch still names `source[index]`.
  """

  def __init__(self, source, records_per_file: int = 1000):
    self.source = source
    size = len(source)
    if size < 1:
      raise ValueError('the data source holds no record')
    self._per_file = records_per_file
    super().__init__([f'records[{start}:{min(start + records_per_file, size)}]'
                      for start in range(0, size, records_per_file)])

  def records(self, file_number, position=0, record_number=0,
              block_size=STREAM_BLOCK):
    del position, block_size  # The record number says where; no buffering.
    start = file_number * self._per_file
    stop = min(start + self._per_file, len(self.source))
    for index in range(start + record_number, stop):
      yield index, index + 1, self.source[index]


def make_reader(config: ml_collections.ConfigDict,
                retry_policy=retry.RetryPolicy()):
  """The sequential reader of the source `config` describes (see
  `sources.default_source_config`); lists its files, reads none."""
  kind = config.kind
  if kind == 'synthetic':
    return IndexedReader(sources.make_source(config))
  if kind not in sources.SOURCE_KINDS:
    raise ValueError(f'unknown data source kind {kind!r} (config key '
                     f'"kind"); expected one of {sources.SOURCE_KINDS}')
  if not config.path:
    raise FileNotFoundError(f'data source kind {kind!r} needs config key '
                            '"path", which is empty')
  paths = shards.list_files(config.path)
  if kind == 'tfrecord':
    return TFRecordReader(paths, image_key=config.image_key,
                          caption_key=config.caption_key,
                          key_key=config.key_key, **sources.box_keys(config))
  if kind == 'wds':
    return TarReader(paths)
  return ListReader(paths, image_field=config.image_field,
                    caption_field=config.caption_field,
                    root=config.root or None, retry_policy=retry_policy,
                    **sources.box_fields(config))
