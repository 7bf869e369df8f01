"""Test-wide setup: 8 simulated CPU devices, set before jax is imported."""
import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# One compilation cache for this test process and the training runs it starts:
# the trainer tests compile the same tiny steps many times over.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def gcs_emulator():
  """A GCS-API server on 127.0.0.1 that gs:// paths reach (tests/gcs_emulator.py)."""
  from gcs_emulator import GcsEmulator  # pylint: disable=g-import-not-at-top
  emulator = GcsEmulator()
  yield emulator
  emulator.close()


@pytest.fixture
def gcs_bucket(gcs_emulator):
  """A fresh, empty bucket of the emulator, as 'gs://NAME'."""
  return gcs_emulator.bucket()
