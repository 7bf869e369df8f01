"""Sources on real files: TFRecord (img2dataset features and custom keys),
webdataset tars, JSONL/CSV file lists; damaged shards and missing files are
counted or surfaced per record, never a crash; path patterns; make_source;
host shards disjoint, complete and balanced."""

import gzip
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data_fixtures as fx
from lit_navit.data import sources
from lit_navit.data import synthetic
from lit_navit.data.decode import decode_image
from lit_navit.data.sources import (FileListSource, Record, TFRecordSource,
                                    WebDatasetSource, host_shard)

FIXED_SETTINGS = settings(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture])


def colour(i: int):
  """A distinct colour per example, so decoded pixels identify it."""
  return ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 90) % 256)


def image_bytes(i: int, image_format: str = 'PNG') -> bytes:
  return fx.encode(fx.solid(colour(i), 8, 6), image_format)


def assert_is_example(record: Record, i: int):
  """The record holds example i's caption and an image of its colour."""
  assert record.caption == f'caption {i}'
  assert not record.error
  pixels = decode_image(record.image)
  assert pixels.shape == (6, 8, 3)
  np.testing.assert_allclose(pixels[3, 4], colour(i), atol=6)


# TFRecord.


@pytest.fixture(scope='module')
def tfrecord_dir(tmp_path_factory):
  """Two img2dataset-style shards (3 + 4 records), one custom-key shard and
  one shard with a bad record in the middle, all written by TensorFlow."""
  folder = tmp_path_factory.mktemp('tfrecord')
  examples = [fx.make_example({'jpg': image_bytes(i, 'JPEG'),
                               'txt': f'caption {i}', 'key': f'{i:09d}'})
              for i in range(7)]
  fx.write_tfrecord(folder / 'train-00000-of-00002.tfrecord', examples[:3])
  fx.write_tfrecord(folder / 'train-00001-of-00002.tfrecord', examples[3:])
  fx.write_tfrecord(folder / 'custom.tfrecord', [
      fx.make_example({'image/encoded': image_bytes(i), 'caption': f'caption {i}'})
      for i in range(3)])
  bad = [examples[0],
         b'\xff' * 40,                             # Not a protobuf.
         fx.make_example({'txt': 'caption 99'}),   # No image feature.
         examples[1]]
  fx.write_tfrecord(folder / 'bad.tfrecord', bad)
  return folder


def test_tfrecord_reads_img2dataset_features_in_index_order(tfrecord_dir):
  """'jpg', 'txt' and 'key' features of two shards read back as records
  0..6 in shard order, with keys naming shard, position and key."""
  source = TFRecordSource(str(tfrecord_dir / 'train-*.tfrecord'))
  assert len(source) == 7 and source.skipped == {}
  for i in range(7):
    record = source[i]
    assert record.index == i
    assert_is_example(record, i)
  shard1 = str(tfrecord_dir / 'train-00001-of-00002.tfrecord')
  assert source[4].key == f'{shard1}#1:000000004'


def test_tfrecord_random_access_in_any_order(tfrecord_dir):
  """Reading indices shuffled, repeated or negative-free gives the same
  records as reading in order; an out-of-range index is an IndexError."""
  source = TFRecordSource(str(tfrecord_dir / 'train-*.tfrecord'))
  in_order = [source[i] for i in range(7)]
  order = np.random.default_rng(0).permutation(np.repeat(np.arange(7), 2))
  for i in order:
    assert source[int(i)] == in_order[i]
  assert source[np.int64(3)] == in_order[3]
  for index in (7, -1):
    with pytest.raises(IndexError, match='out of range'):
      source[index]


def test_tfrecord_custom_feature_keys(tfrecord_dir):
  """image_key/caption_key pick other feature names; with no key feature
  the record key is path#n."""
  path = str(tfrecord_dir / 'custom.tfrecord')
  source = TFRecordSource(path, image_key='image/encoded',
                          caption_key='caption', key_key='id')
  assert len(source) == 3
  for i in range(3):
    assert_is_example(source[i], i)
  assert source[2].key == f'{path}#2'
  # With the default keys the same file has no image: an error record each.
  default = TFRecordSource(path)
  assert default[0].image == b'' and "'jpg'" in default[0].error


def test_tfrecord_bad_records_come_back_as_error_records(tfrecord_dir):
  """An unparseable payload and an Example without the image are records
  with image=b'' and an error naming why; their neighbours read fine."""
  source = TFRecordSource(str(tfrecord_dir / 'bad.tfrecord'))
  assert len(source) == 4 and source.skipped == {}
  assert_is_example(source[0], 0)
  assert_is_example(source[3], 1)
  assert source[1].image == b'' and source[1].error.startswith('unparseable')
  assert source[1].key.endswith('bad.tfrecord#1')
  assert source[2].image == b'' and source[2].error == "no 'jpg' feature"
  assert source[2].caption == 'caption 99'


def test_tfrecord_truncated_shard_keeps_whole_records(tfrecord_dir, tmp_path):
  """A shard missing its last bytes keeps the records before the cut and
  counts the cut one as 'truncated'; the other shard is untouched."""
  data = (tfrecord_dir / 'train-00000-of-00002.tfrecord').read_bytes()
  (tmp_path / 'a.tfrecord').write_bytes(data[:-3])
  (tmp_path / 'b.tfrecord').write_bytes(
      (tfrecord_dir / 'train-00001-of-00002.tfrecord').read_bytes())
  source = TFRecordSource(f'{tmp_path}/a.tfrecord,{tmp_path}/b.tfrecord')
  assert len(source) == 2 + 4
  assert source.skipped == {'truncated': 1}
  for index, example in [(0, 0), (1, 1), (2, 3), (5, 6)]:
    assert_is_example(source[index], example)


def test_tfrecord_damaged_length_header_stops_that_shard(tfrecord_dir, tmp_path):
  """A flipped bit in a record's length header fails its checksum: that
  record and the rest of its shard are counted as 'corrupt_header', the
  records before it kept (the walk is never sent astray)."""
  data = bytearray((tfrecord_dir / 'train-00001-of-00002.tfrecord').read_bytes())
  first_length = int.from_bytes(data[:8], 'little')
  second = 12 + first_length + 4
  data[second] ^= 0x10
  path = tmp_path / 'damaged.tfrecord'
  path.write_bytes(bytes(data))
  source = TFRecordSource(str(path))
  assert len(source) == 1 and source.skipped == {'corrupt_header': 1}
  assert_is_example(source[0], 3)


def tfrecord_bytes_and_boundaries(tfrecord_dir):
  data = (tfrecord_dir / 'train-00001-of-00002.tfrecord').read_bytes()
  ends, offset = [], 0
  while offset < len(data):
    offset += 12 + int.from_bytes(data[offset:offset + 8], 'little') + 4
    ends.append(offset)
  assert ends[-1] == len(data) and len(ends) == 4
  return data, ends


@FIXED_SETTINGS
@given(cut=st.integers(0, 10**6))
def test_tfrecord_any_truncation_keeps_a_prefix_and_counts_the_rest(
    tfrecord_dir, tmp_path, cut):
  """Cut anywhere, a shard yields exactly its whole records before the cut,
  intact, and counts one 'truncated' iff the cut splits a record."""
  data, ends = tfrecord_bytes_and_boundaries(tfrecord_dir)
  cut %= len(data) + 1
  path = tmp_path / 'cut.tfrecord'
  path.write_bytes(data[:cut])
  source = TFRecordSource(str(path))
  whole = sum(end <= cut for end in ends)
  assert len(source) == whole
  assert source.skipped == ({} if cut in [0] + ends else {'truncated': 1})
  for i in range(whole):
    assert source[i].caption == f'caption {i + 3}' and not source[i].error


# Webdataset tars.


def img2dataset_members(indices, image_format='jpg', with_json=True):
  """Members as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json."""
  pil_format = {'jpg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}[image_format]
  members = []
  for i in indices:
    key = f'{i:09d}'
    members.append((f'{key}.{image_format}',
                    fx.encode(fx.solid(colour(i), 8, 6), pil_format,
                              **({'lossless': True} if pil_format == 'WEBP' else {}))))
    members.append((f'{key}.txt', f'caption {i}'.encode()))
    if with_json:
      members.append((f'{key}.json', json.dumps(
          {'key': key, 'url': f'http://x/{i}', 'status': 'success'}).encode()))
  return members


def test_wds_reads_img2dataset_shards(tmp_path):
  """KEY.jpg/.png/.webp + KEY.txt (+ KEY.json) members become one record
  per key, shard after shard, keyed 'shard:KEY'."""
  fx.write_tar(tmp_path / '00000.tar', img2dataset_members(range(3)))
  fx.write_tar(tmp_path / '00001.tar', img2dataset_members(range(3, 5), 'png'))
  fx.write_tar(tmp_path / '00002.tar',
               img2dataset_members(range(5, 7), 'webp', with_json=False))
  source = WebDatasetSource(str(tmp_path / '{00000..00002}.tar'))
  assert len(source) == 7 and source.skipped == {}
  for i in range(7):
    assert source[i].index == i
    assert_is_example(source[i], i)
  assert source[4].key == f'{tmp_path}/00001.tar:000000004'
  assert source[6].image.startswith(b'RIFF')
  with pytest.raises(IndexError):
    source[7]


def test_wds_members_grouped_by_key_in_folders_and_any_order(tmp_path):
  """Keys include their folder; members of a key may come in any order and
  with upper-case extensions; dotted suffixes (.seg.png) don't confuse it."""
  members = [('a/0001.txt', b'caption 0'),
             ('a/0001.JPEG', image_bytes(0, 'JPEG')),
             ('b/0001.jpg', image_bytes(1, 'JPEG')),
             ('b/0001.seg.png', image_bytes(5)),
             ('b/0001.txt', b'  caption 1\n')]
  fx.write_tar(tmp_path / 'x.tar', members)
  source = WebDatasetSource(str(tmp_path / 'x.tar'))
  assert len(source) == 2 and source.skipped == {}
  assert [source[i].key.split(':')[-1] for i in range(2)] == ['a/0001', 'b/0001']
  assert_is_example(source[0], 0)
  assert_is_example(source[1], 1)


def test_wds_keys_without_image_or_caption_are_skipped_and_counted(tmp_path):
  """A key with only .txt/.json is counted 'no_image', one with only an
  image 'no_caption'; files without extension and hidden files (macOS
  ._ litter, .DS_Store) are not examples at all; the rest read normally."""
  members = img2dataset_members(range(2))
  members += [('000000007.txt', b'caption 7'), ('000000007.json', b'{}'),
              ('000000008.jpg', image_bytes(8, 'JPEG')),
              ('README', b'no extension, ignored'),
              ('._000000009.jpg', b'macOS metadata, ignored'),
              ('.DS_Store', b'hidden file, ignored')]
  members += img2dataset_members(range(2, 3))
  fx.write_tar(tmp_path / 's.tar', members)
  source = WebDatasetSource(str(tmp_path / 's.tar'))
  assert source.skipped == {'no_image': 1, 'no_caption': 1}
  assert len(source) == 3
  for i in range(3):
    assert_is_example(source[i], i)


def tar_bytes_and_member_ends(tmp_path, count=4):
  """A shard of `count` examples (jpg + txt) as bytes, and for each key
  the byte where its last member's data ends."""
  path = fx.write_tar(tmp_path / 'full.tar',
                      img2dataset_members(range(count), with_json=False))
  with tarfile.open(path) as tar:
    ends = {}
    for member in tar:
      ends[member.name.split('.')[0]] = member.offset_data + member.size
  return open(path, 'rb').read(), ends


def test_wds_truncated_shard_keeps_whole_examples_and_counts(tmp_path):
  """A shard cut inside the last member's data, inside a member's header,
  or exactly between members keeps the examples before the cut and counts
  the damage; a compressed shard is a ValueError naming it."""
  data, ends = tar_bytes_and_member_ends(tmp_path)
  with tarfile.open(tmp_path / 'full.tar') as tar:
    last = tar.getmembers()[-1]
    third_header = tar.getmembers()[4].offset
  for cut, kept in [(last.offset_data + 3, 3),   # Inside data.
                    (third_header + 100, 2),     # Inside a header.
                    (third_header, 2)]:          # Between members.
    path = tmp_path / f'cut{cut}.tar'
    path.write_bytes(data[:cut])
    source = WebDatasetSource(str(path))
    assert len(source) == kept, cut
    assert sum(source.skipped.values()) >= 1, (cut, source.skipped)
    assert 'truncated' in source.skipped
    for i in range(kept):
      assert_is_example(source[i], i)
  gz = tmp_path / 'shard.tar.gz'
  gz.write_bytes(gzip.compress(data))
  with pytest.raises(ValueError, match='shard.tar.gz.*not an uncompressed tar'):
    WebDatasetSource(str(gz))


def test_wds_damaged_header_mid_shard_is_counted(tmp_path):
  """A corrupted member header in the middle of a shard (checksum no longer
  matching) ends the walk there; the loss is counted as 'corrupt_shard',
  not silently dropped."""
  data, _ = tar_bytes_and_member_ends(tmp_path)
  with tarfile.open(tmp_path / 'full.tar') as tar:
    header = tar.getmembers()[4].offset  # Example 2's image.
  damaged = bytearray(data)
  damaged[header + 3] ^= 0x01
  path = tmp_path / 'damaged.tar'
  path.write_bytes(bytes(damaged))
  source = WebDatasetSource(str(path))
  assert len(source) == 2 and source.skipped == {'corrupt_shard': 1}


@FIXED_SETTINGS
@given(cut=st.integers(0, 10**6))
def test_wds_any_truncation_never_crashes_nor_loses_silently(tmp_path, cut):
  """Cut anywhere, a shard yields exactly the examples whose members all
  end before the cut, intact, and whenever an example is lost the damage
  is counted."""
  data, ends = tar_bytes_and_member_ends(tmp_path)
  cut %= len(data) + 1
  path = tmp_path / 'cut.tar'
  path.write_bytes(data[:cut])
  source = WebDatasetSource(str(path))
  complete = sum(end <= cut for end in ends.values())
  assert len(source) == complete
  for i in range(complete):
    assert source[i].caption == f'caption {i}'
  if len(source) < len(ends):
    assert sum(source.skipped.values()) >= 1, source.skipped


# File lists.


@pytest.fixture
def image_folder(tmp_path):
  """images/0.png .. images/2.png under tmp_path."""
  (tmp_path / 'images').mkdir()
  for i in range(3):
    (tmp_path / 'images' / f'{i}.png').write_bytes(image_bytes(i))
  return tmp_path


def test_jsonl_paths_resolve_against_the_lists_folder(image_folder):
  """Relative image paths resolve against the list's folder; absolute
  paths are used as they are; captions are stripped."""
  rows = [{'image': 'images/0.png', 'caption': 'caption 0 '},
          {'image': str(image_folder / 'images' / '1.png'), 'caption': 'caption 1'},
          {'image': 'images/2.png', 'caption': 'caption 2', 'extra': 1}]
  path = image_folder / 'list.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '\n')
  source = FileListSource(str(path))
  assert len(source) == 3 and source.skipped == {}
  for i in range(3):
    assert_is_example(source[i], i)
  assert source[0].key == str(image_folder / 'images' / '0.png')


def test_csv_and_tsv_paths_resolve_against_root(image_folder, tmp_path_factory):
  """A CSV (quoted commas in captions) or TSV in another folder, with
  custom column names, resolves relative paths against `root`."""
  lists = tmp_path_factory.mktemp('lists')
  csv_path = lists / 'pairs.csv'
  csv_path.write_text('file,text\n"0.png","caption 0"\n1.png,"caption 1"\n')
  tsv_path = lists / 'pairs.tsv'
  tsv_path.write_text('file\ttext\n2.png\tcaption 2\n')
  root = image_folder / 'images'
  source = FileListSource(csv_path, image_field='file', caption_field='text',
                          root=root)
  assert len(source) == 2
  assert_is_example(source[0], 0)
  assert_is_example(source[1], 1)
  tsv = FileListSource(tsv_path, image_field='file', caption_field='text',
                       root=str(root))
  assert_is_example(tsv[0], 2)
  quoted = lists / 'quoted.csv'
  quoted.write_text('image,caption\n0.png,"a red, round thing"\n')
  assert FileListSource(quoted, root=root)[0].caption == 'a red, round thing'
  # Without root the list's own folder is used, where there is no 0.png.
  assert FileListSource(csv_path, image_field='file', caption_field='text')[0].error


def test_missing_image_file_is_an_error_record_not_fatal(image_folder):
  """A listed image that does not exist reads as image=b'' with an error
  naming why; the records around it read fine."""
  path = image_folder / 'list.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in [
      {'image': 'images/0.png', 'caption': 'caption 0'},
      {'image': 'images/gone.png', 'caption': 'lost'},
      {'image': 'images/1.png', 'caption': 'caption 1'}]))
  source = FileListSource(path)
  assert len(source) == 3
  missing = source[1]
  assert missing.image == b'' and missing.caption == 'lost'
  assert 'unreadable' in missing.error and 'No such file' in missing.error
  assert missing.key.endswith('gone.png')
  assert_is_example(source[0], 0)
  assert_is_example(source[2], 1)


def test_bad_list_lines_are_skipped_and_counted(image_folder):
  """Unparseable lines, non-objects, rows without image or caption are
  skipped and counted by reason; blank lines are not rows at all."""
  path = image_folder / 'list.jsonl'
  path.write_text('\n'.join([
      json.dumps({'image': 'images/0.png', 'caption': 'caption 0'}),
      '{not json',
      '["a", "list"]',
      json.dumps({'caption': 'no image'}),
      json.dumps({'image': '', 'caption': 'empty image'}),
      json.dumps({'image': 'images/1.png'}),
      json.dumps({'image': 'images/1.png', 'caption': 7}),
      '',
      json.dumps({'image': 'images/2.png', 'caption': 'caption 2'})]) + '\n')
  source = FileListSource(path)
  assert source.skipped == {'bad_line': 2, 'no_image': 2, 'no_caption': 2}
  assert len(source) == 2
  assert_is_example(source[1], 2)


def test_file_list_errors_name_the_problem(image_folder):
  """Missing list or root: FileNotFoundError naming it; unknown extension
  or a CSV without the needed column: ValueError naming it."""
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    FileListSource(image_folder / 'nope.jsonl')
  listed = image_folder / 'list.jsonl'
  listed.write_text('{"image": "images/0.png", "caption": "c"}\n')
  with pytest.raises(FileNotFoundError, match='no_such_root'):
    FileListSource(listed, root=image_folder / 'no_such_root')
  parquet = image_folder / 'list.parquet'
  parquet.write_bytes(b'PAR1')
  with pytest.raises(ValueError, match="'.parquet'"):
    FileListSource(parquet)
  headless = image_folder / 'list.csv'
  headless.write_text('path,caption\nimages/0.png,c\n')
  with pytest.raises(ValueError, match="'image'"):
    FileListSource(headless)


# Path patterns.


def test_expand_paths_globs_braces_commas_and_lists(tmp_path):
  """Globs come back sorted; '{00..02}' ranges keep their zero padding;
  comma-separated and list inputs are concatenated in the order given."""
  for name in ('s-00.tar', 's-01.tar', 's-02.tar', 's-10.tar', 'other.tar'):
    (tmp_path / name).write_bytes(b'')
  t = str(tmp_path)
  assert sources.expand_paths(f'{t}/s-*.tar') == [
      f'{t}/s-00.tar', f'{t}/s-01.tar', f'{t}/s-02.tar', f'{t}/s-10.tar']
  assert sources.expand_paths(f'{t}/s-{{00..02}}.tar') == [
      f'{t}/s-00.tar', f'{t}/s-01.tar', f'{t}/s-02.tar']
  assert sources.expand_paths(f'{t}/other.tar, {t}/s-1*.tar') == [
      f'{t}/other.tar', f'{t}/s-10.tar']
  assert sources.expand_paths([tmp_path / 's-02.tar', f'{t}/s-0{{0..1}}.tar']) == [
      f'{t}/s-02.tar', f'{t}/s-00.tar', f'{t}/s-01.tar']
  assert sources.expand_paths(f'{t}/s-{{0..1}}{{0..0}}.tar') == [
      f'{t}/s-00.tar', f'{t}/s-10.tar']


def test_expand_paths_missing_files_are_errors_naming_them(tmp_path):
  """A glob matching nothing, a missing listed file and a missing member of
  a range are each a FileNotFoundError naming it — no shard is quietly
  left out."""
  (tmp_path / 's-00.tar').write_bytes(b'')
  (tmp_path / 's-02.tar').write_bytes(b'')
  t = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'x-\*\.tar'):
    sources.expand_paths(f'{t}/x-*.tar')
  with pytest.raises(FileNotFoundError, match='gone.tar'):
    sources.expand_paths(f'{t}/s-00.tar,{t}/gone.tar')
  with pytest.raises(FileNotFoundError, match='s-01.tar'):
    sources.expand_paths(f'{t}/s-{{00..02}}.tar')
  with pytest.raises(FileNotFoundError):
    sources.expand_paths(' , ')
  # A folder is not "not found": it is there, and is not a data file.
  with pytest.raises(IsADirectoryError, match=f"data path '{t}' is a folder"):
    sources.expand_paths(t)


def test_a_glob_in_a_missing_bucket_names_the_bucket(gcs_emulator):
  with pytest.raises(FileNotFoundError,
                     match='bucket gs://no-such-bucket-b2 does not exist'):
    sources.expand_paths('gs://no-such-bucket-b2/o/*.tfrecord')


# make_source.


def source_config(**overrides) -> ml_collections.ConfigDict:
  config = sources.default_source_config()
  config.update(overrides)
  return config


def test_make_source_builds_every_kind(tfrecord_dir, tmp_path, image_folder):
  """Each kind in SOURCE_KINDS builds its source from the config's keys."""
  synthetic_source = sources.make_source(source_config(
      size=5, seed=2, split='heldout', image_format='png', max_side=40))
  assert isinstance(synthetic_source, synthetic.SyntheticSource)
  assert len(synthetic_source) == 5 and synthetic_source.split == 'heldout'
  assert synthetic_source[0].image.startswith(b'\x89PNG')

  tfrecord = sources.make_source(source_config(
      kind='tfrecord', path=str(tfrecord_dir / 'custom.tfrecord'),
      image_key='image/encoded', caption_key='caption'))
  assert isinstance(tfrecord, TFRecordSource)
  assert_is_example(tfrecord[1], 1)

  fx.write_tar(tmp_path / 'w.tar', img2dataset_members(range(2)))
  wds = sources.make_source(source_config(kind='wds',
                                          path=str(tmp_path / 'w.tar')))
  assert isinstance(wds, WebDatasetSource) and len(wds) == 2

  listed = tmp_path / 'list.csv'
  listed.write_text('img,txt\n1.png,caption 1\n')
  files = sources.make_source(source_config(
      kind='files', path=str(listed), image_field='img', caption_field='txt',
      root=str(image_folder / 'images')))
  assert isinstance(files, FileListSource)
  assert_is_example(files[0], 1)
  assert set(sources.SOURCE_KINDS) == {'synthetic', 'tfrecord', 'wds', 'files'}


def test_make_source_errors_name_the_kind_or_path(tmp_path):
  """An unknown kind is a ValueError naming it; an empty or missing path
  is a FileNotFoundError naming the key or the path."""
  with pytest.raises(ValueError, match="'parquet'"):
    sources.make_source(source_config(kind='parquet', path='x'))
  for kind in ('tfrecord', 'wds', 'files'):
    with pytest.raises(FileNotFoundError, match='"path"'):
      sources.make_source(source_config(kind=kind, path=''))
    missing = str(tmp_path / f'missing-{kind}.data')
    with pytest.raises(FileNotFoundError, match=f'missing-{kind}'):
      sources.make_source(source_config(kind=kind, path=missing))


# Host sharding.


@settings(max_examples=300, deadline=None)
@given(num_examples=st.integers(0, 5000), process_count=st.integers(1, 64))
def test_host_shards_are_disjoint_complete_and_balanced(num_examples,
                                                        process_count):
  """Over all hosts the blocks are contiguous, in host order, disjoint,
  cover 0..n-1 together and differ in size by at most one."""
  blocks = [host_shard(num_examples, p, process_count)
            for p in range(process_count)]
  assert all(b.step == 1 for b in blocks)
  flat = [i for b in blocks for i in b]
  assert flat == list(range(num_examples))
  sizes = [len(b) for b in blocks]
  assert max(sizes) - min(sizes) <= 1
  assert sum(sizes) == num_examples


def test_host_shard_rejects_bad_arguments():
  """A host index outside [0, count), a count below 1 or a negative size
  is a ValueError."""
  for args in [(10, 2, 2), (10, -1, 2), (10, 0, 0), (-1, 0, 1)]:
    with pytest.raises(ValueError):
      host_shard(*args)


@pytest.mark.parametrize('process_count', [1, 2, 3, 5, 8])
def test_hosts_reading_their_shards_see_every_record_once(tmp_path,
                                                          process_count):
  """Three tar shards (7 examples) read by every 'host' through its
  host_shard: each record is read by exactly one host, and every one is."""
  fx.write_tar(tmp_path / 'a-0.tar', img2dataset_members(range(3)))
  fx.write_tar(tmp_path / 'a-1.tar', img2dataset_members(range(3, 4)))
  fx.write_tar(tmp_path / 'a-2.tar', img2dataset_members(range(4, 7)))
  seen = []
  for host in range(process_count):
    # Each host builds its own source, as separate processes would.
    source = WebDatasetSource(f'{tmp_path}/a-{{0..2}}.tar')
    seen += [source[i].caption for i in host_shard(len(source), host,
                                                   process_count)]
  assert sorted(seen) == sorted(f'caption {i}' for i in range(7))
  assert len(seen) == len(set(seen)) == 7
