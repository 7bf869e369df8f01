"""One training run per workdir: the lock file WORKDIR/lock.json.

Two trainers on one workdir would interleave their checkpoints and metrics,
so the second refuses at start-up, naming the holder. The lock holds JSON
(host, pid, since, heartbeat, token) and is created only where none exists
(`fs.write_if_version`: O_EXCL locally, a generation precondition on gs://),
so of two trainers starting at once exactly one gets it.

The holder rewrites `heartbeat` every `timeout / 10` seconds, each time only
if the lock is still the one it wrote. A lock is stale when its process is
dead on this host, or its heartbeat is older than `timeout` (a host gone
silent); a stale lock is taken over, with a warning naming it. Multi-host:
process 0 holds the one lock of the run; the others only hear whether it got it.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid

from lit_navit import fs

LOCK_FILE = 'lock.json'
TIMEOUT = 600.0  # seconds without a heartbeat before a lock is stale

log = logging.getLogger('lit_navit')


class WorkdirLocked(OSError):
  """Another run holds the workdir."""


class WorkdirLock:
  """The workdir's lock, held from `acquire()` to `release()`."""

  def __init__(self, workdir: str, *, timeout: float = TIMEOUT):
    self.path = fs.join(workdir, LOCK_FILE)
    self.timeout = timeout
    self._version = None
    self._holder = {'host': socket.gethostname(), 'pid': os.getpid(),
                    'since': time.time(), 'token': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None

  def _contents(self) -> bytes:
    return json.dumps(dict(self._holder, heartbeat=time.time())).encode()

  def acquire(self) -> None:
    """Takes the lock (a stale one too), or raises WorkdirLocked."""
    for _ in range(3):  # A holder that goes as we look: look again.
      try:
        self._version = fs.write_if_version(self.path, self._contents())
        break
      except FileExistsError:
        pass
      try:
        data, version = fs.read_versioned(self.path)
      except FileNotFoundError:
        continue
      holder = _parse(data)
      why = self._stale(holder)
      if why is None:
        raise WorkdirLocked(
            f'workdir {fs.dirname(self.path)} is in use by {_describe(holder)} '
            f'(its lock {self.path}, heartbeat {time.time() - holder["heartbeat"]:.0f} s '
            'ago); stop that run or use another workdir')
      try:
        self._version = fs.write_if_version(self.path, self._contents(), version)
      except FileExistsError:
        continue  # Someone else took it over first.
      log.warning('took over the stale lock %s of %s: %s', self.path,
                  _describe(holder), why)
      break
    else:
      raise WorkdirLocked(f'the lock {self.path} keeps changing: is another '
                          'run starting in this workdir?')
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()

  def _stale(self, holder: dict) -> str | None:
    """Why the lock of `holder` is stale, or None while it is alive."""
    if holder.get('host') == socket.gethostname() and not _alive(holder.get('pid')):
      return f'its process {holder.get("pid")} is gone'
    silent = time.time() - holder.get('heartbeat', 0)
    if silent > self.timeout:
      return f'no heartbeat for {silent:.0f} s (timeout {self.timeout:.0f} s)'
    return None

  def _beat(self) -> None:
    while not self._stop.wait(self.timeout / 10):
      try:
        self._version = fs.write_if_version(self.path, self._contents(), self._version)
      except FileExistsError:
        log.error('lost the workdir lock %s: another run took it over', self.path)
        return
      except OSError as e:  # A storage hiccup: the next beat tries again.
        log.warning('could not renew the workdir lock %s: %s', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._version is not None:
      try:
        fs.remove_if_version(self.path, self._version)
      except (FileExistsError, FileNotFoundError):
        pass  # Taken over meanwhile: it is no longer ours to remove.
      self._version = None


def _parse(data: bytes) -> dict:
  try:
    holder = json.loads(data)
    float(holder['heartbeat'])
    return holder
  except (ValueError, KeyError, TypeError):
    # Unreadable (a torn write): as if its holder had gone silent at once.
    return {'host': '?', 'pid': '?', 'since': 0, 'heartbeat': 0}


def _describe(holder: dict) -> str:
  since = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(holder.get('since', 0))))
  return f'host {holder.get("host")} pid {holder.get("pid")} since {since}'


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:
    pass  # Another user's process: alive.
  return True
