"""The workdir: one trainer at a time (the lock), and bad steps set aside
without ever merging into or replacing what is already there."""

import pytest

from lit_navit import checkpoint
from lit_navit import fs


def _bad_step(directory, step, content):
  fs.makedirs(fs.join(directory, str(step), 'state'))
  with fs.open(fs.join(directory, str(step), 'state', 'data'), 'wb') as f:
    f.write(content)


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_a_step_set_aside_twice_keeps_both(where, tmp_path, request):
  root = request.getfixturevalue('gcs_bucket') if where == 'gs' else str(tmp_path)
  checkpointer = checkpoint.Checkpointer(fs.join(root, 'w'), keep=3, async_save=False)
  directory = checkpointer.directory
  for content in (b'first', b'second'):
    _bad_step(directory, 1, content)
    checkpointer._set_aside(1)  # pylint: disable=protected-access
  checkpointer.close()
  assert fs.listdir(directory) == ['1.corrupt-0', '1.corrupt-1']
  assert fs.read_bytes(fs.join(directory, '1.corrupt-0', 'state', 'data')) == b'first'
  assert fs.read_bytes(fs.join(directory, '1.corrupt-1', 'state', 'data')) == b'second'


def test_rename_never_lands_on_an_existing_target(tmp_path):
  for name in ('a', 'b'):
    (tmp_path / name).mkdir()
  with pytest.raises(FileExistsError, match='exists'):
    fs.rename(str(tmp_path / 'a'), str(tmp_path / 'b'))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b']
