"""The workdir: one trainer at a time (the lock), and bad steps set aside
without ever merging into or replacing what is already there."""

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit import fs
from lit_navit import train
from lit_navit import workdir_lock

import tiny_config


@pytest.fixture(params=['local', 'gs'])
def workdir(request, tmp_path):
  if request.param == 'gs':
    return fs.join(request.getfixturevalue('gcs_bucket'), 'run')
  return str(tmp_path)


def _plant(workdir, **holder):
  """A lock as another run left it."""
  fs.makedirs(workdir)
  holder = {'host': 'elsewhere', 'pid': 1, 'since': 0.0, 'heartbeat': time.time(),
            'token': 'theirs', **holder}
  with fs.open(fs.join(workdir, workdir_lock.LOCK_FILE), 'wb') as f:
    f.write(json.dumps(holder).encode())


def _holder(workdir):
  return json.loads(fs.read_bytes(fs.join(workdir, workdir_lock.LOCK_FILE)))


def _dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_a_second_run_is_refused_naming_the_holder_until_the_first_ends(workdir):
  first = workdir_lock.WorkdirLock(workdir)
  first.acquire()
  second = workdir_lock.WorkdirLock(workdir)
  with pytest.raises(workdir_lock.WorkdirLocked) as error:
    second.acquire()
  message = str(error.value)
  assert f'host {socket.gethostname()} pid {os.getpid()} since ' in message
  assert '\n' not in message
  first.release()
  assert not fs.exists(fs.join(workdir, workdir_lock.LOCK_FILE))
  second.acquire()
  second.release()


def test_of_runs_starting_at_once_exactly_one_gets_the_lock(workdir):
  fs.makedirs(workdir)
  locks = [workdir_lock.WorkdirLock(workdir) for _ in range(6)]

  def take(lock):
    try:
      lock.acquire()
      return True
    except workdir_lock.WorkdirLocked:
      return False

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    won = list(pool.map(take, locks))
  assert sum(won) == 1
  locks[won.index(True)].release()


def test_a_stale_lock_is_taken_over_with_a_log_line(workdir, caplog):
  _plant(workdir, host=socket.gethostname(), pid=_dead_pid())
  lock = workdir_lock.WorkdirLock(workdir)
  with caplog.at_level(logging.WARNING, logger='lit_navit'):
    lock.acquire()
  assert 'took over the stale lock' in caplog.text and 'is gone' in caplog.text
  assert _holder(workdir)['token'] != 'theirs'
  lock.release()

  caplog.clear()
  _plant(workdir, heartbeat=time.time() - 120)  # another host, silent
  lock = workdir_lock.WorkdirLock(workdir, timeout=60)
  with caplog.at_level(logging.WARNING, logger='lit_navit'):
    lock.acquire()
  assert 'no heartbeat for 120 s' in caplog.text
  lock.release()


def test_a_live_holder_elsewhere_keeps_its_lock(workdir):
  _plant(workdir, heartbeat=time.time() - 30)
  with pytest.raises(workdir_lock.WorkdirLocked, match='host elsewhere pid 1'):
    workdir_lock.WorkdirLock(workdir, timeout=60).acquire()
  assert _holder(workdir)['token'] == 'theirs'


def test_the_holder_heartbeats_so_its_lock_never_goes_stale(workdir):
  lock = workdir_lock.WorkdirLock(workdir, timeout=1.0)
  lock.acquire()
  first = _holder(workdir)['heartbeat']
  time.sleep(1.5)  # longer than the timeout
  assert _holder(workdir)['heartbeat'] > first + 0.5
  # From another host's point of view too (the pid check does not apply).
  other = workdir_lock.WorkdirLock(workdir, timeout=1.0)
  other._holder['host'] = 'elsewhere'  # pylint: disable=protected-access
  with pytest.raises(workdir_lock.WorkdirLocked):
    other.acquire()
  lock.release()


def test_training_refuses_a_locked_workdir_before_compiling(tmp_path):
  _plant(str(tmp_path))
  config = config_lib.load_config_file(f'{tiny_config.__file__}:steps=2')
  with pytest.raises(workdir_lock.WorkdirLocked, match='in use by host elsewhere'):
    train.train(config, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_FILE]


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
