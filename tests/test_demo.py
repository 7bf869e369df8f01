"""The CPU demo end to end, shortened: train, evaluate, export, query."""

import importlib.util
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from lit_navit import checkpoint
from lit_navit import trainer as trainer_lib

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 300
EXAMPLES = 128


@pytest.fixture(scope='module')
def demo_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  env = dict(os.environ, XLA_FLAGS='', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run(
      [sys.executable, '-m', 'lit_navit.demo', '--workdir', workdir,
       '--config', os.path.join(ROOT, 'configs', f'demo.py:steps={STEPS}'),
       '--eval_examples', str(EXAMPLES)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return workdir


def test_demo_learns_and_writes_its_summary(demo_workdir):
  with open(os.path.join(demo_workdir, 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  assert summary['steps'] == STEPS and summary['seconds'] > 0
  assert summary['zero_shot_chance'] == pytest.approx(1 / 64)
  # A short run already beats chance by a wide margin on combinations no
  # training caption named (the full demo reaches >10x).
  assert summary['zero_shot_top1'] >= 3 * summary['zero_shot_chance'], summary
  assert summary['text_to_image_r1'] > 1 / EXAMPLES


def test_demo_exports_embeddings_and_answers_a_query(demo_workdir):
  export_dir = os.path.join(demo_workdir, 'export')
  assert os.listdir(os.path.join(export_dir, 'img_emb'))
  assert os.listdir(os.path.join(export_dir, 'metadata'))
  with open(os.path.join(demo_workdir, 'summary.json'), encoding='utf-8') as f:
    query = json.load(f)['query']
  exported = set()
  for name in os.listdir(os.path.join(export_dir, 'metadata')):
    exported.update(pq.read_table(os.path.join(export_dir, 'metadata', name))
                    .column('key').to_pylist())
  assert len(exported) == EXAMPLES
  assert len(query['top_keys']) == 5 and set(query['top_keys']) <= exported


def test_script_and_in_training_hook_give_the_same_zero_shot(demo_workdir, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'zero_shot_imagenet', os.path.join(ROOT, 'eval', 'zero_shot_imagenet.py'))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  output = str(tmp_path / 'zero_shot.json')
  script.main(['--checkpoint', demo_workdir, '--synthetic', str(EXAMPLES),
               '--batch_rows', '8', '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    script_top1 = json.load(f)['results'][0]['top1']

  config, params = checkpoint.load_for_inference(demo_workdir)
  with config.unlocked():
    config.evals.zero_shot_examples = EXAMPLES
  hook = trainer_lib.Trainer(config, str(tmp_path / 'hook')).zero_shot(params)
  assert hook['eval/zero_shot/top1'] == script_top1
  assert script_top1 > config.evals.zero_shot_examples ** -1
