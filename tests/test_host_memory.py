"""host_memory: the CLIs restart once with glibc's malloc tuned, and a
GLIBC_TUNABLES the user set is left alone."""

import os
import subprocess
import sys
import textwrap

import pytest

from lit_navit import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints what the process sees after restart_with_tuned_malloc, and its pid.
PROBE = ('import os, sys; from lit_navit import host_memory; '
         'print("before", os.getpid(), flush=True); '
         'host_memory.restart_with_tuned_malloc(); '
         'print("after", os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), '
         'sys.argv[1:])')


def run_probe(env_update, *args):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(env_update)
  env['PYTHONPATH'] = ROOT
  out = subprocess.run([sys.executable, '-c', PROBE, *args], env=env,
                       capture_output=True, text=True, check=True, timeout=60)
  return out.stdout.split('\n')


@pytest.mark.skipif(not host_memory._is_glibc(), reason='glibc only')  # pylint: disable=protected-access
def test_restarts_once_with_the_tunables_keeping_pid_and_arguments():
  lines = run_probe({}, '--flag', 'x y')
  befores = [l for l in lines if l.startswith('before')]
  afters = [l for l in lines if l.startswith('after')]
  # The first run re-executes; the second sees the tunables and goes on.
  assert len(befores) == 2 and len(afters) == 1
  pids = {l.split()[1] for l in befores + afters}
  assert len(pids) == 1  # exec, not a child process: signals reach it
  assert repr(host_memory.TUNABLES) in afters[0]
  assert "['--flag', 'x y']" in afters[0]


@pytest.mark.parametrize('value', ['', 'glibc.malloc.hugetlb=1'])
def test_a_users_glibc_tunables_is_left_alone(value):
  lines = run_probe({'GLIBC_TUNABLES': value})
  assert len([l for l in lines if l.startswith('before')]) == 1
  after, = [l for l in lines if l.startswith('after')]
  assert repr(value) in after


@pytest.mark.skipif(not host_memory._is_glibc(), reason='glibc only')  # pylint: disable=protected-access
def test_tunables_keep_a_repeated_large_allocation_mapped():
  """What the tunables are for: a 256 MB block freed and allocated again
  faults its pages in once with them, every time without."""
  script = textwrap.dedent("""
      import ctypes, resource
      libc = ctypes.CDLL(None)
      libc.malloc.restype = ctypes.c_void_p
      libc.free.argtypes = [ctypes.c_void_p]
      def touch():
        block = libc.malloc(1 << 28)
        ctypes.memset(block, 1, 1 << 28)
        libc.free(block)
      touch()
      start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(4):
        touch()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
      """)
  def faults(tunables):
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    out = subprocess.run([sys.executable, '-c', script], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout.split()[-1])
  pages = (1 << 28) // os.sysconf('SC_PAGE_SIZE')
  assert faults('') >= 4 * pages * 0.9
  assert faults(host_memory.TUNABLES) < pages * 0.05
