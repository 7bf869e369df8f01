"""Streaming training data: host shards, sequential readers, the record
stream and its exact resume, on real TFRecord, tar and list files."""

import collections
import json
import os

import fsspec
import numpy as np
import pytest

import data_fixtures
from data_fixtures import assert_same_batches, take
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import readers
from lit_navit.data import retry
from lit_navit.data import shards
from lit_navit.data import streaming
from lit_navit.data import synthetic
from lit_navit.data import text

TEXT_LEN = 8


# Real data files.

def synthetic_records(count, seed=0):
  source = synthetic.SyntheticSource(count, seed=seed, min_side=16, max_side=64)
  return [source[i] for i in range(count)]


def write_tfrecords(folder, files, per_file, seed=0):
  records = synthetic_records(files * per_file, seed)
  paths = []
  for f in range(files):
    chunk = records[f * per_file:(f + 1) * per_file]
    paths.append(data_fixtures.write_tfrecord(
        os.path.join(folder, f'train-{f:03d}.tfrecord'),
        [data_fixtures.make_example({'jpg': r.image, 'txt': r.caption,
                                     'key': f'{f}-{n}'})
         for n, r in enumerate(chunk)]))
  return paths


def write_tars(folder, files, per_file, seed=0):
  records = synthetic_records(files * per_file, seed)
  paths = []
  for f in range(files):
    members = []
    for n, r in enumerate(records[f * per_file:(f + 1) * per_file]):
      members += [(f'{f}-{n:04d}.jpg', r.image),
                  (f'{f}-{n:04d}.txt', r.caption.encode()),
                  (f'{f}-{n:04d}.json', b'{}')]
    paths.append(data_fixtures.write_tar(
        os.path.join(folder, f'train-{f:03d}.tar'), members))
  return paths


def truncate(path, keep_fraction=0.7):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(int(size * keep_fraction))


@pytest.fixture(scope='module')
def tfrecord_paths(tmp_path_factory):
  return write_tfrecords(tmp_path_factory.mktemp('tfrecord'), 5, 7)


# A real fsspec filesystem over local files that counts opens and storage
# reads (fetches) and fails chosen fetches, as object storage can.

class CountingFileSystem(fsspec.AbstractFileSystem):
  protocol = 'countingtest'
  opens = collections.Counter()
  fetches = collections.Counter()
  failing = {}  # path -> fetches still to fail (a negative count: all)

  @classmethod
  def reset(cls):
    cls.opens.clear()
    cls.fetches.clear()
    cls.failing.clear()

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    if not os.path.exists(path):
      raise FileNotFoundError(path)
    return {'name': path, 'size': os.path.getsize(path),
            'type': 'directory' if os.path.isdir(path) else 'file'}

  def _open(self, path, mode='rb', block_size=None, autocommit=True,
            cache_options=None, **kwargs):
    type(self).opens[path] += 1
    return _CountingFile(self, path, mode, block_size=block_size or 2**16,
                         cache_options=cache_options, **kwargs)


class _CountingFile(fsspec.spec.AbstractBufferedFile):

  def _fetch_range(self, start, end):
    counts = type(self.fs)
    counts.fetches[self.path] += 1
    left = counts.failing.get(self.path, 0)
    if left:
      counts.failing[self.path] = left - 1
      raise ConnectionResetError(f'injected failure reading {self.path}')
    with open(self.path, 'rb') as f:
      f.seek(start)
      return f.read(end - start)


fsspec.register_implementation(CountingFileSystem.protocol, CountingFileSystem,
                               clobber=True)


@pytest.fixture
def counting():
  CountingFileSystem.reset()
  yield CountingFileSystem
  CountingFileSystem.reset()


def counted(paths):
  return [f'{CountingFileSystem.protocol}://{os.path.abspath(p)}' for p in paths]


# Host shards.

@pytest.mark.parametrize('num_files', [1, 2, 3, 5, 8])
@pytest.mark.parametrize('hosts', [1, 2, 3, 7])
def test_each_record_belongs_to_exactly_one_host_each_epoch(num_files, hosts):
  for epoch in range(3):
    owners = collections.Counter()
    for host in range(hosts):
      for shard in shards.host_shards(num_files, seed=1, epoch=epoch,
                                      process_index=host, process_count=hosts):
        for record in range(12):
          if shard.keeps(record):
            owners[shard.file, record] += 1
    assert owners == {(f, r): 1 for f in range(num_files) for r in range(12)}


def test_file_order_is_reshuffled_each_epoch_the_same_on_every_host():
  orders = [[s.file for s in shards.host_shards(
      20, seed=3, epoch=epoch, process_index=0, process_count=1)]
            for epoch in range(3)]
  assert all(sorted(order) == list(range(20)) for order in orders)
  assert orders[0] != orders[1] != orders[2]
  again = [s.file for s in shards.host_shards(20, seed=3, epoch=1,
                                              process_index=0, process_count=1)]
  assert again == orders[1]


def read_epoch_zero(reader, hosts, **stream_args):
  """Example ids each host read in epoch 0 (read until epoch 8 begins: a
  record may stay in the shuffle buffer for a while)."""
  per_host = []
  for host in range(hosts):
    stream = streaming.RecordStream(reader, seed=0, process_index=host,
                                    process_count=hosts, **stream_args)
    ids = []
    for ref, record in stream:
      if ref.epoch >= 8:
        break
      if ref.epoch == 0:
        assert record.index == readers.example_id(ref.file, ref.record)
        ids.append(record.index)
    per_host.append(ids)
  return per_host


@pytest.mark.parametrize('hosts', [1, 2, 3, 7])
def test_hosts_stream_every_record_once_an_epoch(tfrecord_paths, hosts):
  reader = readers.TFRecordReader(tfrecord_paths)
  per_host = read_epoch_zero(reader, hosts, cycle_length=2, shuffle_buffer=6)
  everything = [readers.example_id(f, r) for f in range(5) for r in range(7)]
  assert sorted(i for ids in per_host for i in ids) == everything
  assert all(per_host)  # 7 hosts share 5 files: still, all read some.


def test_each_epoch_streams_a_new_order(tfrecord_paths):
  stream = streaming.RecordStream(readers.TFRecordReader(tfrecord_paths),
                                  seed=0, cycle_length=2, shuffle_buffer=6)
  by_epoch = collections.defaultdict(list)
  for ref, record in stream:
    if ref.epoch == 8:
      break
    by_epoch[ref.epoch].append(record.index)
  assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == sorted(by_epoch[2])
  assert len(by_epoch[0]) == 35
  assert by_epoch[0] != by_epoch[1] != by_epoch[2]


def test_eval_mode_reads_the_files_once_in_order(tfrecord_paths):
  stream = streaming.RecordStream(readers.TFRecordReader(tfrecord_paths),
                                  seed=0, train=False)
  ids = [record.index for _, record in stream]
  assert ids == [readers.example_id(f, r) for f in range(5) for r in range(7)]


# Readers.

def write_list(folder, kind):
  records = synthetic_records(6, seed=4)
  for n, r in enumerate(records):
    with open(os.path.join(folder, f'{n}.jpg'), 'wb') as f:
      f.write(r.image)
  path = os.path.join(folder, f'list.{kind}')
  with open(path, 'w') as f:
    if kind == 'jsonl':
      for n, r in enumerate(records):
        f.write(json.dumps({'image': f'{n}.jpg', 'caption': r.caption}) + '\n')
      f.write('not json\n')
      f.write(json.dumps({'image': 'missing.jpg', 'caption': 'gone'}) + '\n')
    else:
      f.write('image,caption\n')
      for n, r in enumerate(records):
        f.write(f'{n}.jpg,"{r.caption}, quoted"\n')
  return path, records


@pytest.mark.parametrize('kind', ['tfrecord', 'tar', 'jsonl', 'csv'])
def test_read_at_every_position_gives_the_streamed_record(tmp_path, kind):
  if kind == 'tfrecord':
    reader = readers.TFRecordReader(write_tfrecords(tmp_path, 2, 4))
    expected = [r.caption for r in synthetic_records(8)]
  elif kind == 'tar':
    reader = readers.TarReader(write_tars(tmp_path, 2, 4))
    expected = [r.caption for r in synthetic_records(8)]
  else:
    path, records = write_list(tmp_path, kind)
    reader = readers.ListReader([path], retry_policy=retry.RetryPolicy(0))
    expected = [r.caption + ('' if kind == 'jsonl' else ', quoted')
                for r in records]
  streamed = [(f, item) for f in range(len(reader.paths))
              for item in reader.records(f)]
  good = [record for _, (_, _, record) in streamed if not record.error]
  assert [r.caption for r in good] == expected
  assert all(r.image[:2] == b'\xff\xd8' for r in good)  # JPEG bytes.
  for number, (f, (position, next_position, record)) in enumerate(streamed):
    assert next_position > position or next_position == readers.END
    record_number = record.index - readers.example_id(f, 0)
    assert reader.read_at(f, position, record_number) == record
  errors = [record.error.split(':')[0] for _, (_, _, record) in streamed
            if record.error]
  assert errors == (['bad_line', 'unreadable'] if kind == 'jsonl' else [])


def test_damaged_files_end_with_one_counted_record(tmp_path):
  tfrecords = write_tfrecords(tmp_path, 2, 6)
  truncate(tfrecords[1])
  with open(tfrecords[0], 'r+b') as f:  # Break the 4th record's length checksum.
    offsets = [p for p, _, _ in readers.TFRecordReader(tfrecords).records(0)]
    f.seek(offsets[3] + 8)
    f.write(b'\0\0\0\0')
  tars = write_tars(tmp_path, 1, 6)
  truncate(tars[0], 0.6)
  for reader, expect in [
      (readers.TFRecordReader(tfrecords), [(3, 'corrupt_header'), (1, 'truncated')]),
      (readers.TarReader(tars), [(1, 'truncated')])]:
    for f, (good, reason) in enumerate(expect):
      records = [record for _, _, record in reader.records(f)]
      errors = [r.error.split(':')[0] for r in records if r.error]
      # The records before the damage are kept; a tar key cut short
      # before its caption reads as 'no_caption'.
      assert errors[-1] == reason and set(errors[:-1]) <= {'no_caption'}
      assert records[-1].error and len(records) - len(errors) >= good


# Sequential reading and retries.

def test_streaming_reads_each_file_front_to_back_in_few_large_reads(
    tmp_path, counting):
  paths = counted(write_tfrecords(tmp_path, 3, 40))
  stream = streaming.RecordStream(readers.TFRecordReader(paths), seed=0,
                                  cycle_length=3, shuffle_buffer=10)
  for ref, _ in stream:
    if ref.epoch == 2:
      break
  # Each file opened once an epoch (epochs 0, 1 and the start of 2), and
  # each opening read in one storage fetch of 40 records, not one a record.
  stripped = [p.split('://', 1)[1] for p in paths]
  assert all(2 <= counting.opens[p] <= 3 for p in stripped)
  assert all(counting.fetches[p] == counting.opens[p] for p in stripped)


def test_a_transient_failure_is_retried_with_backoff_and_changes_nothing(
    tmp_path, counting):
  paths = counted(write_tfrecords(tmp_path, 3, 10))
  reader = readers.TFRecordReader(paths)

  def first_epoch(policy):
    stream = streaming.RecordStream(reader, seed=0, cycle_length=2,
                                    shuffle_buffer=4, retry_policy=policy)
    return records_of_epoch(stream, 0)

  clean = first_epoch(retry.RetryPolicy(3, 0.5, sleep=lambda s: None))
  counting.failing[paths[1].split('://', 1)[1]] = 2
  pauses = []
  flaky = first_epoch(retry.RetryPolicy(3, 0.5, sleep=pauses.append))
  assert flaky == clean
  assert pauses == [0.5, 1.0]


def records_of_epoch(stream, epoch):
  """The records of `epoch`, read until a few epochs later (files of the
  next epoch open while the last of this one are read)."""
  found = []
  for ref, record in stream:
    if ref.epoch >= epoch + 4:
      return found
    if ref.epoch == epoch:
      found.append(record)
  return found


def test_a_file_that_keeps_failing_is_skipped_then_the_budget_stops_the_run(
    tmp_path, counting):
  paths = counted(write_tfrecords(tmp_path, 4, 5))
  broken = paths[2].split('://', 1)[1]
  counting.failing[broken] = -1  # Every fetch fails.
  skipped = collections.Counter()
  policy = retry.RetryPolicy(2, 0.1, sleep=lambda s: None)
  stream = streaming.RecordStream(
      readers.TFRecordReader(paths), seed=0, cycle_length=2, shuffle_buffer=0,
      retry_policy=policy, bad_file_budget=0.3,
      on_skip=lambda reason, detail: skipped.update([reason]))
  ids = [record.index for record in records_of_epoch(stream, 0)]
  assert sorted(ids) == [readers.example_id(f, r) for f in (0, 1, 3)
                         for r in range(5)]
  assert set(skipped) == {'unreadable_file'}  # Once an epoch.
  # One file of four is within a 30% budget; two are not.
  counting.failing[paths[0].split('://', 1)[1]] = -1
  stream = streaming.RecordStream(
      readers.TFRecordReader(paths), seed=0, cycle_length=2, shuffle_buffer=0,
      retry_policy=policy, bad_file_budget=0.3)
  with pytest.raises(streaming.BrokenSource, match='could not be read.*countingtest|'
                     'could not be read.*train-00'):
    records_of_epoch(stream, 0)


# The pipeline on real files: exact resume, small state, damage counted.

@pytest.fixture(scope='module')
def tokenizer():
  return text.Tokenizer(text.default_tokenizer_path(), TEXT_LEN)


def stream_config(**overrides):
  config = pipeline_lib.default_config()
  config.update(tokens_per_row=64, images_per_row=6, text_len=TEXT_LEN,
                patch_sizes=(4, 8), pack_buffer=10, workers=2,
                cycle_length=2, shuffle_buffer=6, captions_per_row=2.5)
  config.resolution.update(min=16, max=64)
  config.token_drop.update(kind='beta', rate=0.3)
  config.update(overrides)
  return config


@pytest.mark.parametrize('kind', ['tfrecord', 'tar'])
def test_restore_from_every_state_gives_the_same_batches(tmp_path, tokenizer,
                                                         kind):
  """grain-style, on real files with a damaged tail and a bad image."""
  if kind == 'tfrecord':
    paths = write_tfrecords(tmp_path, 3, 5)
    reader_cls = readers.TFRecordReader
  else:
    paths = write_tars(tmp_path, 3, 5)
    reader_cls = readers.TarReader
  truncate(paths[2], 0.8)
  config = stream_config()
  steps = 14

  def pipeline():
    return pipeline_lib.Pipeline(reader_cls(paths), tokenizer, config, rows=2,
                                 seed=7, groups=2)

  with pipeline() as pipe:
    states, batches = [], []
    for _ in range(steps):
      states.append(json.loads(json.dumps(pipe.get_state())))
      batches.append(next(pipe))
    final = pipe.get_state()
  assert final['stream']['epoch'] >= 2  # Wrapped over epochs.
  assert final['skipped'].get('truncated', 0) >= 2  # Once an epoch.
  for step, state in enumerate(states):
    with pipeline() as restored:
      restored.set_state(state)
      assert restored.get_state() == state
      assert_same_batches(take(restored, steps - step), batches[step:])
      assert restored.get_state() == final


def test_state_is_small_and_does_not_grow_with_the_data(tmp_path, tokenizer):
  sizes = []
  for files, per_file in [(2, 4), (40, 30)]:
    folder = tmp_path / f'{files}x{per_file}'
    folder.mkdir()
    paths = write_tfrecords(folder, files, per_file)
    with pipeline_lib.Pipeline(readers.TFRecordReader(paths), tokenizer,
                               stream_config(), rows=2, seed=0) as pipe:
      take(pipe, 3)
      sizes.append(len(json.dumps(pipe.get_state())))
  # References only: the shuffle buffer, open files and pending images.
  assert max(sizes) < 2500
  assert sizes[1] < 1.3 * sizes[0]


def test_resuming_on_another_number_of_hosts_is_refused(tfrecord_paths,
                                                        tokenizer):
  config = stream_config()
  with pipeline_lib.Pipeline(readers.TFRecordReader(tfrecord_paths), tokenizer,
                             config, rows=2, seed=0, process_index=1,
                             process_count=2) as pipe:
    take(pipe, 1)
    state = pipe.get_state()
  with pipeline_lib.Pipeline(readers.TFRecordReader(tfrecord_paths), tokenizer,
                             config, rows=2, seed=0) as other:
    with pytest.raises(ValueError, match='2 hosts and this run has 1'):
      other.set_state(state)


def test_streaming_from_gcs(gcs_bucket, tmp_path, tokenizer):
  local = write_tfrecords(tmp_path, 2, 4)
  filesystem = fsspec.filesystem('gs')
  for path in local:
    filesystem.put_file(path, f'{gcs_bucket[5:]}/data/{os.path.basename(path)}')
  source = pipeline_lib.sources.default_source_config()
  source.update(kind='tfrecord', path=f'{gcs_bucket}/data/train-*.tfrecord')
  reader = readers.make_reader(source)
  assert len(reader.paths) == 2 and reader.paths[0].startswith('gs://')
  stream = streaming.RecordStream(reader, seed=0, cycle_length=2,
                                  shuffle_buffer=3)
  captions = sorted(record.caption for record in records_of_epoch(stream, 0))
  assert captions == sorted(r.caption for r in synthetic_records(8))


def test_the_bad_file_budget_survives_a_resume(tmp_path, counting):
  """A stream that failed a file, saved and restored, still counts that
  failure: failing a second file trips the budget as it does uninterrupted."""
  paths = counted(write_tfrecords(tmp_path, 4, 5))
  policy = retry.RetryPolicy(0, 0.1, sleep=lambda s: None)
  skipped = []

  def stream():
    return streaming.RecordStream(
        readers.TFRecordReader(paths), seed=0, cycle_length=1, shuffle_buffer=0,
        retry_policy=policy, bad_file_budget=0.3,
        on_skip=lambda reason, detail: skipped.append(detail))

  # Epoch 0 reads the files in this order; the first and third keep failing.
  order = [paths[s.file] for s in shards.host_shards(
      4, seed=0, epoch=0, process_index=0, process_count=1)]
  for path in (order[0], order[2]):
    counting.failing[path.split('://', 1)[1]] = -1
  with pytest.raises(streaming.BrokenSource, match='2 of .* files of epoch 0 could not be read'):
    records_of_epoch(stream(), 0)

  skipped.clear()
  first = stream()
  next(first)  # The first file failed and was skipped: the second's record.
  assert len(skipped) == 1
  state = json.loads(json.dumps(first.get_state()))
  assert state['failed_files'] == {'0': 1}
  resumed = stream()
  resumed.set_state(state)
  with pytest.raises(streaming.BrokenSource, match='2 of .* files of epoch 0 could not be read'):
    records_of_epoch(resumed, 0)


def test_files_of_garbage_stop_the_stream_naming_the_last(tmp_path):
  """A user error (one line, exit 2), not a traceback."""
  paths = []
  for n in range(2):
    paths.append(str(tmp_path / f'garbage-{n}.tfrecord'))
    with open(paths[-1], 'wb') as f:
      f.write(np.random.default_rng(n).bytes(3000))
  stream = streaming.RecordStream(readers.TFRecordReader(paths), seed=0,
                                  cycle_length=1, shuffle_buffer=0)
  with pytest.raises(streaming.BrokenSource, match='gave no readable record.*garbage-'):
    for _ in range(100):
      next(stream)
  assert isinstance(streaming.BrokenSource('x'), ValueError)  # a user error
