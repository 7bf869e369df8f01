"""lit_navit.fs on a local folder and on a bucket of a real GCS-API server."""

import os

import pytest

from lit_navit import fs


@pytest.fixture(params=['local', 'gcs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path)
  return request.getfixturevalue('gcs_bucket')


def test_write_read_list_glob_rename_remove(root):
  folder = fs.join(root, 'a', 'b')
  fs.makedirs(folder)
  for name in ('x.txt', 'y.txt', 'z.bin'):
    with fs.atomic_write(fs.join(folder, name), 'w') as f:
      f.write(name)
  assert fs.read_text(fs.join(folder, 'y.txt')) == 'y.txt'
  assert fs.read_bytes(fs.join(folder, 'z.bin')) == b'z.bin'
  assert fs.size(fs.join(folder, 'x.txt')) == 5
  assert fs.listdir(folder) == ['x.txt', 'y.txt', 'z.bin']
  assert fs.glob(fs.join(root, 'a', '*', '*.txt')) == [
      fs.join(folder, 'x.txt'), fs.join(folder, 'y.txt')]
  assert fs.isdir(folder) and not fs.isdir(fs.join(folder, 'x.txt'))
  assert fs.isfile(fs.join(folder, 'x.txt')) and not fs.isfile(folder)

  fs.rename(fs.join(folder, 'x.txt'), fs.join(root, 'moved.txt'))
  assert fs.read_text(fs.join(root, 'moved.txt')) == 'x.txt'
  assert not fs.exists(fs.join(folder, 'x.txt'))
  fs.remove(fs.join(root, 'moved.txt'))
  assert not fs.exists(fs.join(root, 'moved.txt'))
  fs.rmtree(fs.join(root, 'a'))
  assert not fs.exists(folder) and fs.listdir(fs.join(root, 'a')) == []


def test_seek_and_partial_reads(root):
  path = fs.join(root, 'data.bin')
  with fs.atomic_write(path) as f:
    f.write(bytes(range(256)) * 4)
  with fs.open(path) as f:
    f.seek(300)
    assert f.read(4) == bytes([44, 45, 46, 47])
    assert f.tell() == 304


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(root):
  path = fs.join(root, 'state.json')
  with fs.atomic_write(path, 'w') as f:
    f.write('old')
  with pytest.raises(RuntimeError):
    with fs.atomic_write(path, 'w') as f:
      f.write('half of the new')
      raise RuntimeError('crash mid-write')
  assert fs.read_text(path) == 'old'
  assert fs.listdir(root) == ['state.json']  # No temporary left behind.


def test_missing_paths(root):
  missing = fs.join(root, 'nothing', 'here.txt')
  assert not fs.exists(missing)
  assert fs.glob(fs.join(root, 'nothing', '*')) == []
  with pytest.raises(FileNotFoundError):
    fs.read_bytes(missing)


def test_missing_bucket_is_not_found(gcs_emulator):
  assert not fs.exists('gs://no-such-bucket-here/x')
  with pytest.raises(FileNotFoundError):
    fs.read_bytes('gs://no-such-bucket-here/x')


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fs.absolute('x') == os.path.join(str(tmp_path), 'x')
  assert fs.absolute('gs://b/x') == 'gs://b/x'
  assert not fs.is_remote('x') and fs.is_remote('gs://b/x')


def test_orbax_sees_what_this_layer_moves(gcs_bucket):
  """epath (orbax's view of folders) lists through its own, caching fsspec
  instance; a step set aside here must vanish from its listing too."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  step = epath.Path(fs.join(gcs_bucket, 'checkpoints', '12'))
  (step / 'state').mkdir(parents=True, exist_ok=True)
  (step / 'state' / 'data').write_text('x')
  assert [p.name for p in step.parent.iterdir()] == ['12']
  fs.rename(str(step), str(step) + '.corrupt-0')
  assert [p.name for p in step.parent.iterdir()] == ['12.corrupt-0']
  assert not step.exists()
