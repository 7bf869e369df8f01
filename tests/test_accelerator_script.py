"""benchmarks/accelerator.sh in --cpu-smoke mode: every section runs and agrees."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import accelerator  # pylint: disable=wrong-import-position


def test_failures_name_errors_and_comparisons_outside_tolerance():
  result = {'device': {'kind': 'cpu'}, 'train dense': {'error': 'OOM'},
            'attention': {'equal_within_tolerance': False},
            'loss': {'equal_within_tolerance': True}}
  assert accelerator.failures(result) == ['train dense', 'attention']


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
  out = tmp_path / 'accelerator.json'
  env = dict(os.environ, ACCELERATOR_PYTHON=sys.executable, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # One CPU device, not conftest's eight.
  proc = subprocess.run(
      ['bash', os.path.join(ROOT, 'benchmarks', 'accelerator.sh'), '--cpu-smoke',
       '--json', str(out)], env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['failures'] == []
  train = result['train dense']
  assert train['images_per_step'] > 0 and train['compile_seconds'] > 0
  assert train['step_seconds'] > 0 and train['flops'] > 0
  assert result['attention']['fused'] == 'xla'
  assert result['attention']['equal_within_tolerance']
  assert result['loss']['equal_within_tolerance']
  assert 'ring sigmoid loss on 1 device' in proc.stdout
