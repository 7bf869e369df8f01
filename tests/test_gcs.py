"""gs:// end to end, against a real GCS-API server on 127.0.0.1.

Data, tokenizer, workdir, checkpoints, metrics and eval outputs all live in
a bucket; the results must equal the same run from local paths, bit for bit.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_fixtures import make_example, write_tfrecord
from eval_helpers import load_script
from test_train import TINY, _assert_bitwise_equal, _env, _logged_steps, _params
from lit_navit import checkpoint
from lit_navit import fs
from lit_navit.data import synthetic
from lit_navit.data import text

pytestmark = pytest.mark.slow

ARG = 'steps=12,every=4'
SHARDS = 2
RECORDS_PER_SHARD = 40


def _write_data(folder):
  """Two TFRecord shards of synthetic image-caption pairs, the tokenizer, and
  a classification folder (classes/<class>/<n>.jpg) with its templates."""
  source = synthetic.SyntheticSource(size=SHARDS * RECORDS_PER_SHARD, max_side=64)
  os.makedirs(folder, exist_ok=True)
  for shard in range(SHARDS):
    write_tfrecord(os.path.join(folder, f'train-{shard}.tfrecord'), [
        make_example({'jpg': source[i].image, 'txt': source[i].caption, 'key': str(i)})
        for i in range(shard * RECORDS_PER_SHARD, (shard + 1) * RECORDS_PER_SHARD)])
  fs.upload(text.default_tokenizer_path(), os.path.join(folder, 'tokenizer.model'))
  for i in range(12):
    name = synthetic.class_names()[source.attributes(i)['class_id']].replace(' ', '_')
    os.makedirs(os.path.join(folder, 'classes', name), exist_ok=True)
    with open(os.path.join(folder, 'classes', name, f'{i}.jpg'), 'wb') as f:
      f.write(source[i].image)
  with open(os.path.join(folder, 'templates.txt'), 'w', encoding='utf-8') as f:
    f.write('a photo of a {}.\na {}.\n')


def _upload_tree(folder, url):
  for root, _, names in os.walk(folder):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), folder)
      fs.upload(os.path.join(root, name), fs.join(url, *relative.split(os.sep)))


def _data_flags(root):
  return [
      '--config.input.source.kind=tfrecord',
      f'--config.input.source.path={fs.join(root, "train-{0..1}.tfrecord")}',
      f'--config.input.tokenizer={fs.join(root, "tokenizer.model")}']


def _train_cmd(workdir, data_root):
  return [sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:{ARG}',
          f'--workdir={workdir}', *_data_flags(data_root)]


def _run(workdir, data_root, check=True):
  proc = subprocess.run(_train_cmd(workdir, data_root), env=_env(),
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f'training failed:\n{proc.stdout}\n{proc.stderr}')
  return proc


def _kill_after_checkpoint(workdir, data_root, step, logs):
  """Starts a run and SIGKILLs it once orbax has committed checkpoint `step`
  (on object storage: its commit marker is written)."""
  out, err = os.path.join(logs, 'killed.out'), os.path.join(logs, 'killed.err')
  with open(out, 'wb') as stdout, open(err, 'wb') as stderr:
    proc = subprocess.Popen(_train_cmd(workdir, data_root), env=_env(),
                            stdout=stdout, stderr=stderr)
  marker = fs.join(workdir, 'checkpoints', str(step), 'commit_success.txt')
  deadline = time.time() + 900
  while not fs.exists(marker):
    assert proc.poll() is None, open(err, encoding='utf-8').read()
    assert time.time() < deadline, 'timed out'
    time.sleep(0.2)
  proc.kill()
  proc.wait()
  return open(out, encoding='utf-8').read()


def _jsonl_steps(workdir):
  return [json.loads(line)['step'] for line in
          fs.read_text(fs.join(workdir, 'metrics.jsonl')).splitlines()]


@pytest.fixture(scope='module')
def runs(gcs_emulator, tmp_path_factory):
  """The same 12-step run twice: from local paths, uninterrupted; and with
  data and workdir in a bucket, SIGKILLed after checkpoint 4, then resumed."""
  local = tmp_path_factory.mktemp('local')
  data = str(local / 'data')
  _write_data(data)
  bucket = gcs_emulator.bucket()
  remote_data = fs.join(bucket, 'data')
  _upload_tree(data, remote_data)
  _run(str(local / 'run'), data)
  remote_run = fs.join(bucket, 'run')
  killed_stdout = _kill_after_checkpoint(remote_run, remote_data, 4, str(local))
  resumed = _run(remote_run, remote_data)
  return dict(local=str(local), data=data, bucket=bucket, remote_data=remote_data,
              local_run=str(local / 'run'), remote_run=remote_run,
              killed_logged=_logged_steps(killed_stdout), resumed=resumed)


def test_killed_and_resumed_in_a_bucket_equals_a_local_run(runs):
  assert runs['killed_logged'][:4] == [1, 2, 3, 4]
  stderr = runs['resumed'].stderr
  killed_at = max(s for s in (4, 8) if f'resumed from step {s}' in stderr)
  assert _logged_steps(runs['resumed'].stdout) == list(range(killed_at + 1, 13))
  assert 'unreadable' not in stderr
  _assert_bitwise_equal(_params(runs['local_run']), _params(runs['remote_run']))
  # The logs went up to the bucket, cut back to the checkpoint on resume.
  assert _jsonl_steps(runs['remote_run']) == list(range(1, 13))
  assert fs.glob(fs.join(runs['remote_run'], 'tensorboard', 'events.out.tfevents.*'))


def test_eval_scripts_read_and_write_a_bucket_like_local_paths(runs, tmp_path):
  outputs = {}
  for where, run, data, out in (
      ('local', runs['local_run'], runs['data'], str(tmp_path)),
      ('remote', runs['remote_run'], runs['remote_data'], fs.join(runs['bucket'], 'eval'))):
    shards = fs.join(data, 'train-*.tfrecord')
    summary = load_script('export_embeddings').main([
        '--checkpoint', run, '--tfrecord', shards, '--output_dir', fs.join(out, 'export'),
        '--part_size', '32', '--dtype', 'float32', '--no_progress',
        '--output', fs.join(out, 'export_summary.json')])
    assert summary['num_exported'] == SHARDS * RECORDS_PER_SHARD
    load_script('zero_shot_imagenet').main([
        '--checkpoint', run, '--folder', fs.join(data, 'classes'),
        '--templates', fs.join(data, 'templates.txt'), '--max_tokens', '16',
        '--output', fs.join(out, 'zero_shot.json'), '--no_progress'])
    export = fs.join(out, 'export')
    outputs[where] = dict(
        parts=fs.listdir(fs.join(export, 'img_emb')),
        img=[np.load(fs.open(fs.join(export, 'img_emb', name))) for name in
             fs.listdir(fs.join(export, 'img_emb'))],
        # A key names its shard (shard#record:key): compared relative to
        # the data folder.
        keys=[[key.replace(data, 'DATA') for key in
               pq.read_table(fs.open(fs.join(export, 'metadata', name)))['key'].to_pylist()]
              for name in fs.listdir(fs.join(export, 'metadata'))],
        zero_shot=json.loads(fs.read_text(fs.join(out, 'zero_shot.json')))['results'],
        summary_written=fs.isfile(fs.join(out, 'export_summary.json')))
  local, remote = outputs['local'], outputs['remote']
  assert remote['parts'] == local['parts'] == ['img_emb_0.npy', 'img_emb_1.npy',
                                               'img_emb_2.npy']
  for a, b in zip(local['img'], remote['img']):
    np.testing.assert_array_equal(a, b)
  assert remote['keys'] == local['keys']
  for run in remote['zero_shot'] + local['zero_shot']:
    for timing in ('seconds', 'images_per_second'):
      run.pop(timing, None)
  assert remote['zero_shot'] == local['zero_shot']
  assert remote['zero_shot'][0]['num_images'] == 12
  assert remote['summary_written'] and local['summary_written']


def test_newest_unreadable_step_in_a_bucket_falls_back(runs):
  """The trainer sets an unreadable step aside (a copy and delete on object
  storage) and retrains it from the one before, reproducing it exactly."""
  workdir = fs.join(runs['bucket'], 'fallback')
  fs_, root = fs.filesystem(runs['remote_run'])
  fs_.copy(root, fs.filesystem(workdir)[1], recursive=True)
  for path in fs.find(fs.join(workdir, 'checkpoints', '12', 'state')):
    with fs.atomic_write(path) as f:
      f.write(b'garbage')
  proc = _run(workdir, runs['remote_data'])
  assert 'step 12' in proc.stderr and 'unreadable' in proc.stderr
  assert 'resumed from step 8' in proc.stderr
  assert '12.corrupt-0' in fs.listdir(fs.join(workdir, 'checkpoints'))
  _assert_bitwise_equal(_params(runs['local_run']), _params(workdir))


def _user_error(args):
  proc = subprocess.run([sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:{ARG}',
                         *args], env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  return proc.stderr.strip().splitlines()[-1]


def test_a_missing_bucket_or_object_is_one_line_naming_it(gcs_bucket, tmp_path):
  line = _user_error(['--workdir=gs://no-such-bucket-here/run'])
  assert line.startswith('error: workdir ') and 'gs://no-such-bucket-here' in line
  line = _user_error([f'--workdir={gcs_bucket}/run', *_data_flags(f'{gcs_bucket}/nothing')])
  assert line.startswith('error: ') and f'{gcs_bucket}/nothing/tokenizer.model' in line
  fs.upload(text.default_tokenizer_path(), fs.join(gcs_bucket, 'nothing', 'tokenizer.model'))
  line = _user_error([f'--workdir={gcs_bucket}/run', *_data_flags(f'{gcs_bucket}/nothing')])
  assert line.startswith('error: ') and f'{gcs_bucket}/nothing/train-' in line
