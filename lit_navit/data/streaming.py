"""This host's stream of records: interleaved shards through a shuffle buffer.

  train  epochs repeat forever. Each epoch this host reads its own files
         (`shards.host_shards`: a new file order from (seed, epoch)),
         `cycle_length` of them open at once and read in turn, one record
         from each, a finished file's place taken by the host's next file
         (of the next epoch once this one's are all open). Records then pass
         through a buffer of `shuffle_buffer` records: each draw takes the
         record at a place keyed by (seed, epoch, draw counter).
  eval   this host's files once, in order, one at a time; no shuffling.

The state (`get_state`) is small JSON: the epoch and place in its file list
of the next file to open, each open file's (file, byte position, record
number), and the buffered records as references (file, position, record,
epoch), never bytes. `set_state` re-reads the referenced records. Nothing
holds an index of the data set.

Records that the reader marks with `error` (damage) pass straight through,
unbuffered, for the pipeline to count. A storage error (OSError) while
reading a file is retried with exponential backoff (`retry.RetryPolicy`),
the file reopened where it stopped; a file that still fails is skipped and
counted ('unreadable_file'), and when more than `bad_file_budget` of this
host's files of one epoch failed, the stream stops, naming the file.
"""

import collections
import contextlib
import logging

import numpy as np

from lit_navit.data import readers
from lit_navit.data import retry
from lit_navit.data import shards as shards_lib

_SHUFFLE_TAG = 0x7368

class BrokenSource(ValueError):
  """Too many records or files failed: the data or its storage is broken,
  not a few bad records. A user error (one line, exit 2): the message names
  the last file or record that failed."""


Ref = collections.namedtuple('Ref', 'file position record epoch')
Ref.__doc__ = """Where a record lies: file number, byte position, record number
within the file, and the epoch it was read in."""


class _OpenFile:
  """A shard being read: where its next record starts."""

  def __init__(self, epoch, slot, shard, position=0, record=0):
    self.epoch, self.slot, self.shard = epoch, slot, shard
    self.position, self.record = position, record
    self.records = None  # The reader's generator, opened on first read.

  def close(self):
    if self.records is not None:
      self.records.close()
      self.records = None


class RecordStream:
  """Iterator of (Ref, sources.Record) for one host (see module doc).

  Args:
    reader: a `readers` reader (`paths`, `records`, `read_at`).
    seed: the data seed.
    process_index, process_count: this host and the number of hosts.
    train: train mode (else eval, see module doc).
    shuffle: train mode: shuffle the file order and the records (else files
      in order and no shuffle buffer).
    cycle_length: files open at once.
    shuffle_buffer: records in the shuffle buffer (<= 1: no shuffling).
    retry_policy: for storage errors.
    bad_file_budget: the fraction of one epoch's files that may fail.
    on_skip: called with (reason, detail) for each file skipped.
  """

  def __init__(self, reader, *, seed: int, process_index: int = 0,
               process_count: int = 1, train: bool = True,
               shuffle: bool = True,
               cycle_length: int = 16, shuffle_buffer: int = 1000,
               retry_policy: retry.RetryPolicy = retry.RetryPolicy(),
               bad_file_budget: float = 0.1, on_skip=None):
    if cycle_length < 1:
      raise ValueError(f'cycle_length must be >= 1, got {cycle_length}')
    self._reader = reader
    self._num_files = len(reader.paths)
    self._seed = seed
    self._process = (process_index, process_count)
    self._train = train
    self._shuffle = train and shuffle
    self._files_per_epoch = len(self._shards(0))
    self._cycle = min(cycle_length, self._files_per_epoch) if train else 1
    self._buffer_size = shuffle_buffer if self._shuffle else 0
    self._retry = retry_policy
    self._budget = bad_file_budget
    self._on_skip = on_skip or (lambda reason, detail: None)
    self._reset()

  def _reset(self):
    self._epoch = 0  # Epoch of the next file to open,
    self._next = 0  # and its place in that epoch's list.
    self._open = []  # Open files, in turn order.
    self._turn = 0  # Which open file gives the next record.
    self._buffer = []  # (Ref, Record)
    self._draws = 0
    self._failed = collections.Counter()  # epoch -> files that failed
    self._fruitless = 0  # Files finished since the last good record.

  def _shards(self, epoch: int) -> list:
    cached = getattr(self, '_shards_cache', (None, None))
    if cached[0] != epoch:
      cached = (epoch, shards_lib.host_shards(
          self._num_files, seed=self._seed, epoch=epoch,
          process_index=self._process[0], process_count=self._process[1],
          shuffle=self._shuffle))
      self._shards_cache = cached
    return cached[1]

  # Reading.

  def __iter__(self):
    return self

  def __next__(self):
    if self._buffer_size <= 1:
      item = self._read()
      if item is None:
        raise StopIteration
      return item
    while len(self._buffer) < self._buffer_size:
      item = self._read()
      if item is None:
        break
      if item[1].error:
        return item
      self._buffer.append(item)
    if not self._buffer:
      raise StopIteration
    rng = np.random.default_rng(
        [self._seed, _SHUFFLE_TAG, self._epoch, self._draws])
    place = int(rng.integers(len(self._buffer)))
    self._draws += 1
    item = self._buffer[place]
    self._buffer[place] = self._buffer[-1]
    self._buffer.pop()
    return item

  def _next_file(self):
    """The next file to open, or None (eval, after the last)."""
    if self._next == len(self._shards(self._epoch)):
      if not self._train:
        return None
      self._epoch, self._next = self._epoch + 1, 0
    opened = _OpenFile(self._epoch, self._next,
                       self._shards(self._epoch)[self._next])
    self._next += 1
    return opened

  def _read(self):
    """The next (Ref, Record) of the interleaved files, or None at the end."""
    while True:
      while len(self._open) < self._cycle:
        opened = self._next_file()
        if opened is None:
          break
        self._open.append(opened)
      if not self._open:
        return None
      self._turn %= len(self._open)
      current = self._open[self._turn]
      item = self._next_record(current)
      if item is None:
        self._finished(current)
        replacement = self._next_file()
        if replacement is None:
          del self._open[self._turn]
        else:
          self._open[self._turn] = replacement
        continue
      position, next_position, record = item
      ref = Ref(current.shard.file, position, current.record, current.epoch)
      current.position, current.record = next_position, current.record + 1
      if not current.shard.keeps(ref.record):
        continue
      self._turn += 1
      if not record.error:
        self._fruitless = 0
      return ref, record

  def _next_record(self, current: _OpenFile):
    """The file's next (position, next_position, Record); None when done."""
    path = self._reader.paths[current.shard.file]
    if current.position == readers.END:  # After damage: nothing to read.
      return None
    for attempt in range(self._retry.retries + 1):
      try:
        if current.records is None:
          current.records = self._reader.records(
              current.shard.file, current.position, current.record)
        return next(current.records, None)
      except OSError as e:
        current.close()
        if not retry.is_transient(e) or attempt == self._retry.retries:
          self._file_failed(current, path, e)
          return None
        logging.warning('reading %s at byte %d failed (%s); try %d of %d',
                        path, current.position, e, attempt + 2,
                        self._retry.retries + 1)
        self._retry.pause(attempt + 1)
    raise AssertionError('unreachable')

  def _file_failed(self, current: _OpenFile, path: str, error: OSError):
    self._failed[current.epoch] += 1
    failed = self._failed[current.epoch]
    self._on_skip('unreadable_file', f'{path}: {error}')
    logging.warning('skipped the rest of %s from byte %d: %s', path,
                    current.position, error)
    if failed > self._budget * self._files_per_epoch:
      raise BrokenSource(
          f'{failed} of this host\'s {self._files_per_epoch} files of epoch '
          f'{current.epoch} could not be read (budget {self._budget:.0%}): '
          f'the storage looks broken. The last was {path}: {error}')

  def _finished(self, current: _OpenFile):
    current.close()
    self._fruitless += 1
    if self._train and self._fruitless > self._files_per_epoch:
      raise BrokenSource(
          f'{self._fruitless} files in a row gave no readable record, '
          f'more than this host reads an epoch ({self._files_per_epoch}); the '
          f'last was {self._reader.paths[current.shard.file]}')

  # Re-reading references.

  def read_refs(self, refs, map_fn=map) -> list:
    """The records at `refs` (retried), read with `map_fn` (a pool's map)."""
    def read(ref):
      path = self._reader.paths[ref.file]
      return retry.call(
          lambda: self._reader.read_at(ref.file, ref.position, ref.record),
          self._retry, f'{path} at byte {ref.position}')
    return list(map_fn(read, refs))

  # State.

  def get_state(self) -> dict:
    return {
        'files': self._num_files,
        'epoch': self._epoch,
        'next_file': self._next,
        'open': [[f.epoch, f.slot, f.shard.file, f.position, f.record]
                 for f in self._open],
        'turn': self._turn,
        'draws': self._draws,
        'buffer': [list(ref) for ref, _ in self._buffer],
        # An epoch's failures count until its last file is done.
        'failed_files': {str(e): n for e, n in self._failed.items()
                         if e >= self._oldest_epoch_read()},
        'fruitless': self._fruitless,
    }

  def _oldest_epoch_read(self) -> int:
    """The oldest epoch with a file open or still to open."""
    return min([f.epoch for f in self._open] + [self._epoch])

  def set_state(self, state: dict, map_fn=map):
    """Restores `get_state()` output; buffered records are re-read."""
    if state['files'] != self._num_files:
      raise ValueError(
          f'the stream state was saved over {state["files"]} data files and '
          f'{self._num_files} are found now: the data set changed')
    self.close()
    self._reset()
    self._epoch, self._next = int(state['epoch']), int(state['next_file'])
    for epoch, slot, file, position, record in state['open']:
      shard = self._shards(epoch)[slot]
      if shard.file != file:
        raise ValueError(f'stream state: epoch {epoch} file {slot} is file '
                         f'{shard.file} here but {file} in the state')
      self._open.append(_OpenFile(epoch, slot, shard, position, record))
    self._shards(self._epoch)
    self._turn, self._draws = int(state['turn']), int(state['draws'])
    self._failed.update({int(e): int(n)
                         for e, n in state['failed_files'].items()})
    self._fruitless = int(state['fruitless'])
    refs = [Ref(*map(int, ref)) for ref in state['buffer']]
    self._buffer = list(zip(refs, self.read_refs(refs, map_fn)))

  def close(self):
    for opened in self._open:
      with contextlib.suppress(Exception):
        opened.close()
