"""A dying host: one of two JAX processes is SIGKILLed mid-training; the other
stops with an error within the configured heartbeat timeout instead of
hanging. Resuming two processes from a checkpoint is a known defect (xfail)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

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


@pytest.mark.xfail(strict=True, reason='known defect: a checkpoint keeps only '
                   "process 0's pipeline state, so process 1 cannot resume")
def test_two_processes_resume_from_their_checkpoint(tmp_path):
  workdir = str(tmp_path)
  for steps in (2, 4):
    procs = _start_both(workdir, 100, steps=steps)
    errors = [p.communicate(timeout=400)[1] for p in procs]
    for p, stderr in zip(procs, errors):
      assert p.returncode == 0, stderr[-2000:]
  assert _checkpoints(workdir)[-1] == 4
