"""The trainer end to end: real processes, real checkpoints, real signals."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit import rules
from lit_navit import sharding
from lit_navit import train
from lit_navit import trainer as trainer_lib

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, 'tiny_config.py')


def _env(devices=8):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def _train_cmd(workdir, arg='', *overrides):
  return [sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:{arg}',
          f'--workdir={workdir}', *overrides]


def _run(workdir, arg='', *overrides, check=True):
  proc = subprocess.run(_train_cmd(workdir, arg, *overrides), env=_env(),
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f'training failed:\n{proc.stdout}\n{proc.stderr}')
  return proc


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoint.load_for_inference(workdir)[1])


def _assert_bitwise_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 12-step run, checkpoints every 4 steps."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _run(workdir, 'steps=12,every=4')
  return workdir


def test_metrics_and_summaries_are_written(reference):
  records = _metrics(reference)
  assert [r['step'] for r in records] == list(range(1, 13))
  for key in ('loss', 'lr', 't', 'b', 'grad_norm', 'images_per_s', 'tokens_per_s',
              'padding_fraction', 'text_padding_fraction', 'images_per_row', 'mfu',
              'eta_seconds'):
    assert all(np.isfinite(r[key]) for r in records), key
  assert all(0 <= r['padding_fraction'] < 1 for r in records)
  assert all(0 < r['text_padding_fraction'] < 1 for r in records)
  assert records[-1]['eta_seconds'] == 0
  events = os.listdir(os.path.join(reference, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)
  assert _steps(reference) == [4, 8, 12]


@pytest.mark.parametrize('text_packing', [False, True])
def test_step_reports_the_share_of_pad_tokens_the_text_tower_encodes(
    tmp_path, text_packing):
  config = config_lib.load_config_file(TINY + ':steps=1,every=1')
  config.input.text_packing = text_packing
  trainer = trainer_lib.Trainer(config, str(tmp_path))
  try:
    state = trainer.restore_or_init()
    local = next(trainer.pipeline)
    batch = sharding.make_global_batch(trainer_lib.model_inputs(local),
                                       trainer.mesh)
    _, metrics = trainer.compiled_step(state, batch)[0](state, batch)
  finally:
    trainer.pipeline.close()
  assert ('text/segment' in batch) == text_packing
  pads = np.asarray(local['text/tokens']) == config.model.text.pad_id
  assert 0 < pads.mean() < 1
  assert np.isfinite(float(metrics['loss']))
  np.testing.assert_allclose(float(metrics['text_padding_fraction']), pads.mean(),
                             rtol=1e-6)


def test_rerunning_a_finished_run_trains_nothing(reference, tmp_path):
  before = _params(reference)
  proc = _run(reference, 'steps=12,every=4')
  assert 'resumed from step 12' in proc.stderr
  _assert_bitwise_equal(before, _params(reference))


def _start(workdir, arg, *overrides):
  """A training process in the background, its output going to files."""
  os.makedirs(workdir, exist_ok=True)
  name = os.path.join(workdir, f'output-{time.time_ns()}')
  proc = subprocess.Popen(_train_cmd(workdir, arg, *overrides), env=_env(),
                          stdout=open(name + '.out', 'wb'),
                          stderr=open(name + '.err', 'wb'))
  proc.output_name = name
  return proc


def _stderr(proc):
  with open(proc.output_name + '.err', encoding='utf-8') as f:
    return f.read()


def _logged_steps(stdout):
  """The steps whose console line a run printed, in order."""
  return [int(n) for n in re.findall(r'^step (\d+)/', stdout, re.M)]


def _stdout_steps(proc):
  with open(proc.output_name + '.out', encoding='utf-8') as f:
    return _logged_steps(f.read())


def _wait_until(condition, proc, timeout=900):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, _stderr(proc)
    assert time.time() < deadline, 'timed out'
    time.sleep(0.02)


def _kill_after_checkpoint(workdir, arg, step, *overrides):
  """Starts a run and SIGKILLs it as soon as checkpoint `step` is committed
  (orbax renames a finished temporary directory to the step number)."""
  proc = _start(workdir, arg, *overrides)
  _wait_until(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', str(step))),
              proc)
  proc.kill()
  proc.wait()
  return proc


def _resume(workdir, arg, *overrides):
  """Reruns to the end: {'stderr', 'logged': the steps it logged}."""
  proc = _run(workdir, arg, *overrides)
  return {'stderr': proc.stderr, 'logged': _logged_steps(proc.stdout)}


def _corrupt_dirs(workdir):
  return [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if 'corrupt' in d]


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """The reference run, stopped by SIGTERM, resumed, SIGKILLed, resumed.

  Checkpoints come every 2 steps (the reference's every 4: saving does not
  change training), so the kill lands well before the run could finish.
  """
  workdir = str(tmp_path_factory.mktemp('interrupted'))
  arg = 'steps=12,every=2'
  run = {'workdir': workdir}
  proc = _start(workdir, arg)
  # Step 1 is logged once step 2 is under way: stop well before step 12.
  _wait_until(lambda: _stdout_steps(proc), proc)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=900)
  steps = _steps(workdir)
  data_state = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'data')
  run['sigterm'] = dict(returncode=proc.returncode, stderr=_stderr(proc), steps=steps,
                        logged=_stdout_steps(proc), data_state=os.listdir(data_state))
  stopped_at = steps[-1]
  proc = _kill_after_checkpoint(workdir, arg, stopped_at + 2 - stopped_at % 2)
  run['sigkill'] = dict(stderr=_stderr(proc), steps=_steps(workdir),
                        logged=_stdout_steps(proc))
  run['final'] = _resume(workdir, arg)
  return run


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(interrupted):
  stage = interrupted['sigterm']
  assert stage['returncode'] == 0, stage['stderr']
  assert 'saving a checkpoint and stopping' in stage['stderr']
  assert len(stage['steps']) == 1 and 1 <= stage['steps'][0] < 12, stage['steps']
  # The checkpoint holds the last step trained, and its data state.
  assert stage['logged'] == list(range(1, stage['steps'][0] + 1))
  assert stage['data_state']


def test_resume_after_sigterm_continues_from_its_checkpoint(interrupted):
  stopped_at = interrupted['sigterm']['steps'][0]
  stage = interrupted['sigkill']
  assert f'resumed from step {stopped_at}' in stage['stderr'], stage['stderr']
  assert stage['logged'][:1] == [stopped_at + 1], stage['logged']


def test_exact_resume_after_sigterm_then_sigkill(interrupted, reference):
  killed_at = interrupted['sigkill']['steps'][-1]
  assert interrupted['sigterm']['steps'][-1] < killed_at < 12, interrupted['sigkill']
  final = interrupted['final']
  # A restore that failed would fall back to a fresh start, which a
  # deterministic run cannot tell from a resume by its result alone.
  assert f'resumed from step {killed_at}' in final['stderr'], final['stderr']
  assert 'unreadable' not in final['stderr']
  assert final['logged'] == list(range(killed_at + 1, 13))
  assert not _corrupt_dirs(interrupted['workdir'])
  _assert_bitwise_equal(_params(reference), _params(interrupted['workdir']))


def test_corrupt_newest_checkpoint_falls_back_to_previous(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  subprocess.run(['cp', '-r', reference, workdir], check=True)
  state_dir = os.path.join(workdir, 'checkpoints', '12', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  proc = _run(workdir, 'steps=12,every=4')
  assert 'step 12' in proc.stderr and 'unreadable' in proc.stderr
  assert 'resumed from step 8' in proc.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '12.corrupt-0'))
  # Retraining steps 9-12 from step 8 reproduces the lost checkpoint exactly.
  _assert_bitwise_equal(_params(reference), _params(workdir))


def test_nan_loss_stops_naming_the_step(tmp_path):
  # exp(200) overflows float32: the very first loss is not finite.
  proc = _run(str(tmp_path), 'steps=6', '--config.model.t_init=200.0', check=False)
  assert proc.returncode != 0
  assert 'NonFiniteLoss' in proc.stderr and 'at step 1' in proc.stderr


def test_unknown_override_key_fails_before_training(tmp_path):
  proc = _run(str(tmp_path), '', '--config.input.tokens_per_roww=3', check=False)
  assert proc.returncode != 0
  assert 'tokens_per_roww' in proc.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_config_errors_name_the_key(tmp_path):
  config = config_lib.load_config_file(TINY)
  with config.unlocked():
    config.input.tokens_per_roww = 3
  with pytest.raises(ValueError, match='input.tokens_per_roww'):
    config_lib.check_config(config)

  config = config_lib.load_config_file(TINY)
  with config.ignore_type():
    config.input.images_per_row = 'four'
  with pytest.raises(ValueError, match='input.images_per_row'):
    config_lib.check_config(config)

  config = config_lib.load_config_file(TINY + ':batch=6')
  with pytest.raises(ValueError, match='batch_size=6 does not divide'):
    train.train(config, str(tmp_path / 'a'))

  config = config_lib.load_config_file(TINY)
  config.input.source.kind = 'tfrecord'
  config.input.source.path = str(tmp_path / 'missing-*.tfrecord')
  with pytest.raises(FileNotFoundError, match='missing-'):
    train.train(config, str(tmp_path / 'b'))

  with pytest.raises(ValueError, match='loss'):
    config_lib.parse_arg('loss=softmax,lr=3', loss='sigmoid')


def test_lit_locked_tower_loads_from_a_checkpoint_and_stays_bitwise_frozen(
    reference, tmp_path):
  config = config_lib.load_config_file(TINY + ':steps=3,every=3')
  config.init_from = reference
  config.init_params = 'img/.*'
  config.optim.schedule = [('img/.*', None),
                           ('.*', dict(decay_type='cosine', warmup_steps=1))]
  train.train(config, str(tmp_path))
  before, after = _params(reference), _params(str(tmp_path))
  _assert_bitwise_equal(before['img'], after['img'])
  assert not np.array_equal(before['txt']['head']['kernel'], after['txt']['head']['kernel'])


def test_config_arg_names_may_not_shadow_config_dict_methods():
  with pytest.raises(ValueError, match='lock'):
    config_lib.parse_arg('', lock='img')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _TwoHostRows:
  """One process feeding what two hosts would: host 0's rows, then host 1's."""

  def __init__(self, config, groups):
    self.hosts = [trainer_lib.make_pipeline(config, trainer_lib.sources.make_source(
        config.input.source), rows=config.batch_size // 2, groups=groups // 2,
        process_index=i, process_count=2) for i in range(2)]
    self.skipped = self.hosts[0].skipped

  def __next__(self):
    rows = [next(host) for host in self.hosts]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  def get_state(self):
    return [host.get_state() for host in self.hosts]

  def close(self):
    for host in self.hosts:
      host.close()


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  multi = str(tmp_path / 'multi')
  evals = ('--config.evals.heldout.kind=synthetic', '--config.evals.heldout.size=64',
           '--config.evals.heldout_batches=2', '--config.evals.zero_shot_examples=16')
  procs = [subprocess.Popen(
      _train_cmd(multi, 'steps=4,every=4', f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}', *evals),
      env=_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  errors = [p.communicate(timeout=900)[1].decode() for p in procs]
  # Both processes' ends: when one fails, the other's error is only a symptom.
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(
      f'process {i}:\n{err[-2000:]}' for i, err in enumerate(errors))

  single = str(tmp_path / 'single')
  config = config_lib.load_config_file(TINY + ':steps=4,every=4')
  config_lib.apply_overrides(config, [
      (flag[len('--config.'):].split('=')[0], flag.split('=')[1]) for flag in evals])
  trainer = trainer_lib.Trainer(config, single)
  trainer.pipeline.close()
  trainer.pipeline = _TwoHostRows(config, trainer_lib.caption_groups(trainer.mesh))
  trainer.run()

  multi_loss = [r['loss'] for r in _metrics(multi) if 'loss' in r]
  single_loss = [r['loss'] for r in _metrics(single) if 'loss' in r]
  assert len(multi_loss) == 4
  np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
  # The in-training evals run on two hosts too. Zero-shot sees the same
  # images on any number of hosts and agrees with one host's (the held-out
  # loss reads each host's own shard, so only its presence is compared).
  multi_evals, single_evals = (
      {k: v for r in _metrics(w) for k, v in r.items() if k.startswith('eval/')}
      for w in (multi, single))
  assert {'eval/loss', 'eval/zero_shot/top1'} <= set(multi_evals), multi_evals
  assert multi_evals.keys() == single_evals.keys()
  assert np.isfinite(multi_evals['eval/loss'])
  for key in (k for k in multi_evals if k.startswith('eval/zero_shot')):
    np.testing.assert_allclose(multi_evals[key], single_evals[key], rtol=1e-4,
                               err_msg=key)
  # Adam turns float noise in near-zero gradients into steps of up to ~lr
  # (1e-3), so parameters agree to a fraction of one step, not to rtol.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               _params(multi), _params(single))


FSDP = 'steps=12,every=2,fsdp=4'  # a data 2 x fsdp 4 mesh on the 8 devices


@pytest.fixture(scope='module')
def fsdp_reference(tmp_path_factory):
  """The reference run on a data 2 x fsdp 4 mesh, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp('fsdp_reference'))
  _run(workdir, FSDP)
  return workdir


def _saved_shardings(workdir, step):
  """{'params/...' or 'opt_state/...': (mesh shape, partition spec)} as saved."""
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {rules.path_str(path): (tuple(leaf.sharding.shape),
                                 tuple(leaf.sharding.partition_spec))
          for path, leaf in leaves}


def test_fsdp_shards_params_and_adam_moments(fsdp_reference):
  saved = _saved_shardings(fsdp_reference, 12)
  embedding = 'txt/Embed_0/embedding'  # [512, 32]: its larger dimension is split
  assert saved[f'params/{embedding}'] == ((2, 4), ('fsdp', None))
  moments = [spec for path, spec in saved.items()
             if path.startswith('opt_state/') and path.endswith(embedding)]
  assert moments == [((2, 4), ('fsdp', None))] * 2  # Adam's mu and nu


def test_fsdp_trains_like_data_parallel(fsdp_reference, reference):
  fsdp = [r['loss'] for r in _metrics(fsdp_reference)]
  data_parallel = [r['loss'] for r in _metrics(reference)[:12]]
  np.testing.assert_allclose(fsdp, data_parallel, rtol=1e-5)


def test_fsdp_exact_resume_after_sigkill(fsdp_reference, tmp_path):
  workdir = str(tmp_path)
  _kill_after_checkpoint(workdir, FSDP, 2)
  killed_at = _steps(workdir)[-1]
  assert killed_at < 12
  resumed = _resume(workdir, FSDP)
  assert f'resumed from step {killed_at}' in resumed['stderr'], resumed['stderr']
  assert resumed['logged'] == list(range(killed_at + 1, 13))
  assert not _corrupt_dirs(workdir)
  _assert_bitwise_equal(_params(fsdp_reference), _params(workdir))
