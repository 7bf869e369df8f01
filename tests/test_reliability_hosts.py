"""A dying host: one of two JAX processes is SIGKILLed mid-training; the other
stops with an error within the configured heartbeat timeout instead of
hanging. Two processes resume exactly, past a damaged newest step, each from its
own input pipeline position; another number of processes is refused. Hosts
starting together all find their shared workdir writable."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lit_navit import checkpoint

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, 'tiny_config.py')
HEARTBEAT = 10


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_both(workdir, heartbeat, steps=400):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=os.path.dirname(HERE))
  return [subprocess.Popen(
      [sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:steps={steps},every=2',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}', f'--heartbeat_timeout={heartbeat}'],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _errors(procs):
  """What the processes that ended said, minus tracebacks and library noise."""
  out = []
  for i, p in enumerate(procs):
    if p.poll() is not None:
      lines = [l for l in p.stderr.read().splitlines()
               if not l.startswith((' ', 'ERROR    absl', 'Traceback'))]
      out.append(f'process {i} exited {p.returncode}:\n' + '\n'.join(lines[-15:]))
  return '\n'.join(out)


def _checkpoints(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(
      root) else []


@pytest.mark.parametrize('victim', [0, 1])
def test_survivor_of_a_killed_process_exits_in_bounded_time(tmp_path, victim):
  workdir = str(tmp_path)
  procs = _start_both(workdir, HEARTBEAT)
  deadline = time.time() + 400
  while len(_checkpoints(workdir)) < 1:
    assert all(p.poll() is None for p in procs), _errors(procs)
    assert time.time() < deadline
    time.sleep(0.2)
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time()
  survivor = procs[1 - victim]
  try:
    _, stderr = survivor.communicate(timeout=HEARTBEAT + 60)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail(f'process {1 - victim} still running {HEARTBEAT + 60} s after '
                f'process {victim} was killed')
  waited = time.time() - killed_at
  procs[victim].wait()
  assert survivor.returncode != 0, stderr[-2000:]
  print(f'survivor exited {waited:.1f} s after the kill (heartbeat {HEARTBEAT} s)')


def _run_both(workdir, steps):
  procs = _start_both(workdir, 100, steps=steps)
  errors = [p.communicate(timeout=400)[1] for p in procs]
  for p, stderr in zip(procs, errors):
    assert p.returncode == 0, stderr[-2000:]


def test_two_processes_resume_exactly_and_refuse_one(tmp_path):
  resumed, straight = str(tmp_path / 'resumed'), str(tmp_path / 'straight')
  _run_both(resumed, 4)
  assert _checkpoints(resumed) == [2, 4]
  # The newest step is damaged: both hosts pass over it to step 2, process 0
  # sets it aside, and the run trains steps 3 and 4 again.
  os.remove(os.path.join(resumed, 'checkpoints', '4', 'state', 'manifest.ocdbt'))
  _run_both(resumed, 4)
  assert os.path.isdir(os.path.join(resumed, 'checkpoints', '4.corrupt-0'))
  _run_both(straight, 4)
  assert _checkpoints(resumed)[-1] == _checkpoints(straight)[-1] == 4
  # Both hosts' pipelines resumed where they were at step 2: the same
  # parameters, bit for bit, as the run that was never stopped.
  jax.tree.map(np.testing.assert_array_equal, *(
      jax.tree.map(np.asarray, checkpoint.load_for_inference(w)[1])
      for w in (resumed, straight)))

  one = subprocess.run(
      [sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:steps=6,every=2',
       f'--workdir={resumed}'],
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               PYTHONPATH=os.path.dirname(HERE)),
      capture_output=True, text=True, timeout=400)
  assert one.returncode == 2, one.stderr[-2000:]
  assert 'written by 2 processes and this run has 1' in one.stderr


# A host: waits for the start file, then checks the workdir 300 times.
_HOST = """
import os, sys, time
from lit_navit import train
workdir, start = sys.argv[1:]
while not os.path.exists(start):
  time.sleep(0.01)
for _ in range(300):
  train.check_workdir(workdir)
"""


def test_hosts_checking_one_workdir_at_once_all_pass(tmp_path):
  """Every host of a run probes the shared workdir as it starts; one host
  must not delete another's probe (CI once lost a two-process run that way:
  the survivor waited out jax's topology timeout)."""
  workdir, start = str(tmp_path / 'shared'), tmp_path / 'start'
  hosts = [subprocess.Popen([sys.executable, '-c', _HOST, workdir, str(start)],
                            env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)),
                            stderr=subprocess.PIPE, text=True)
           for _ in range(4)]
  start.touch()
  errors = [host.communicate(timeout=120)[1] for host in hosts]
  assert [host.returncode for host in hosts] == [0] * len(hosts), '\n'.join(errors)
  assert os.listdir(workdir) == []
