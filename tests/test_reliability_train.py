"""Trainer faults: resume logs each step once, unreadable checkpoints stop the
run, a non-finite loss leaves its record; real runs on a tiny config."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit import train
from lit_navit import trainer as trainer_lib

pytestmark = pytest.mark.slow

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_config.py')


def _config(arg):
  return config_lib.load_config_file(f'{TINY}:{arg}')


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _tensorboard_values(workdir):
  """{tag: [steps]} over every event file, as a TensorBoard reader sees them."""
  steps = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return steps


def _corrupt(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')


def test_resumed_run_logs_each_step_once(tmp_path):
  workdir = str(tmp_path)
  train.train(_config('steps=8,every=4'), workdir)
  first = {r['step']: r['loss'] for r in _metrics(workdir)}
  # As if killed after logging step 8 but before its checkpoint was kept.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  train.train(_config('steps=8,every=4'), workdir)
  records = _metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 9))
  # The redone steps are the same steps, not new ones.
  assert {r['step']: r['loss'] for r in records} == first
  tags = _tensorboard_values(workdir)
  assert 'loss' in tags
  for tag, steps in tags.items():
    assert sorted(steps) == list(range(1, 9)), tag


def test_every_checkpoint_unreadable_stops_unless_told_to_start_over(tmp_path):
  workdir = str(tmp_path)
  train.train(_config('steps=4,every=2'), workdir)
  first_loss = _metrics(workdir)[0]['loss']
  for step in (2, 4):
    _corrupt(os.path.join(workdir, 'checkpoints', str(step)))
  with pytest.raises(checkpoint.UnreadableCheckpoint) as error:
    train.train(_config('steps=4,every=2'), workdir)
  message = str(error.value)
  assert 'step 4:' in message and 'step 2:' in message and '--start_over' in message
  # Nothing was moved or rewritten.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert len(_metrics(workdir)) == 4

  train.train(_config('steps=4,every=2'), workdir, start_over=True)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '2', '2.corrupt-0', '4', '4.corrupt-0']
  records = _metrics(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert records[0]['loss'] == first_loss  # the same run, from scratch


def test_non_finite_loss_is_logged_and_names_no_checkpoint(tmp_path):
  config = _config('steps=6')
  config.model.t_init = 200.0  # exp(200) overflows float32: the first loss is inf
  with pytest.raises(trainer_lib.NonFiniteLoss) as error:
    train.train(config, str(tmp_path))
  assert 'at step 1' in str(error.value)
  assert 'None' not in str(error.value) and 'no checkpoint yet' in str(error.value)
  records = _metrics(str(tmp_path))
  assert [r['step'] for r in records] == [1]
  assert not np.isfinite(records[0]['loss'])
