"""A real GCS-API server on 127.0.0.1 for gs:// tests (gcp-storage-emulator,
with the generation header it lacks added: gcs_emulator_server.py).

`GcsEmulator` starts the emulator in its own process and points every client
the project uses at it through the environment, which child processes
(training runs started by a test) inherit:

  STORAGE_EMULATOR_HOST          gcsfs (fsspec), so lit_navit.fs and epath
  TENSORSTORE_GCS_HTTP_URL       tensorstore, so orbax's arrays
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore's credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                 else gcsfs probes a gRPC API the emulator
                                 lacks and waits 60 s a call
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import fsspec


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """The emulator process; `bucket()` makes a fresh bucket, gs://NAME."""

  def __init__(self):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    # Its log goes to a file: a pipe nobody reads fills up and then blocks
    # the (single-threaded) server mid-request.
    self._log = tempfile.TemporaryFile()
    self._process = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'gcs_emulator_server.py'), 'start', '--host',
         '127.0.0.1', '--port', str(self.port), '--in-memory', '--quiet'],
        stdout=subprocess.DEVNULL, stderr=self._log)
    self._wait_until_listening()
    self.environ = {
        'STORAGE_EMULATOR_HOST': self.url,
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'EPATH_USE_TF': 'false',
    }
    self._saved = {key: os.environ.get(key) for key in self.environ}
    os.environ.update(self.environ)
    fsspec.filesystem('gs').invalidate_cache()

  def _wait_until_listening(self, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        self._log.seek(0)
        raise RuntimeError('gcp-storage-emulator exited: '
                           + self._log.read().decode()[-2000:])
      try:
        with socket.create_connection(('127.0.0.1', self.port), timeout=1):
          return
      except OSError:
        time.sleep(0.1)
    self._process.kill()
    raise RuntimeError(f'gcp-storage-emulator did not listen on {self.url} '
                       f'within {timeout} s')

  def bucket(self) -> str:
    """A new empty bucket; returns 'gs://NAME'."""
    name = f'test-{uuid.uuid4().hex[:12]}'
    fsspec.filesystem('gs').mkdir(name)
    return f'gs://{name}'

  def close(self):
    self._process.kill()
    self._process.wait()
    self._log.close()
    for key, value in self._saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
