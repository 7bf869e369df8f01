"""The eval/ scripts on two JAX processes (on 127.0.0.1) give what one
process gives: each embeds its block of the images, every process gets all
of them, and process 0 writes the outputs."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from eval_helpers import EVAL_DIR, load_script, write_checkpoint, write_images

pytestmark = pytest.mark.slow

SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16)]


@pytest.fixture(name='workdir', scope='module')
def _workdir(tmp_path_factory):
  return write_checkpoint(str(tmp_path_factory.mktemp('run')))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two_processes(script, args, check=True):
  """Runs eval/{script}.py as processes 0 and 1 of one run; returns their
  (exit status, stdout, stderr)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=os.path.dirname(EVAL_DIR))
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(EVAL_DIR, f'{script}.py'), *args,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}', '--heartbeat_timeout=20'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 or not check, err[-3000:]
    outputs.append((proc.returncode, out, err))
  return outputs


def _without_speed(results):
  """The results less what depends on the machine's speed."""
  if isinstance(results, dict):
    return {k: _without_speed(v) for k, v in results.items()
            if k not in ('images_per_second', 'seconds')}
  if isinstance(results, list):
    return [_without_speed(v) for v in results]
  return results


def _read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def test_zero_shot_on_two_processes_matches_one(workdir, tmp_path):
  # Five images and a corrupt one (in process 1's block of 3).
  names = ['red', 'blue', 'green', 'pink', 'grey']
  for n, name in enumerate(names):
    write_images(str(tmp_path / 'data' / name), [SIZES[n]], seed=n)
  (tmp_path / 'data' / 'red' / 'broken.jpg').write_bytes(b'not a jpeg')
  args = ['--checkpoint', workdir, '--folder', str(tmp_path / 'data'),
          '--templates', '7', '--max_tokens', '8,16', '--no_progress']
  os.makedirs(tmp_path / 'one'), os.makedirs(tmp_path / 'two')  # for the plots
  one = load_script('zero_shot_imagenet').main(
      args + ['--output', str(tmp_path / 'one' / 'zs.json')])
  _run_two_processes('zero_shot_imagenet',
                     args + ['--output', str(tmp_path / 'two' / 'zs.json')])
  two = _read_json(tmp_path / 'two' / 'zs.json')
  assert sorted(os.listdir(tmp_path / 'two')) == ['zs.json', 'zs.png']
  one = _without_speed(_read_json(tmp_path / 'one' / 'zs.json'))
  assert [r['num_images'] for r in one['results']] == [5, 5]
  assert [r['failed'][0]['key'] for r in one['results']] == [
      str(tmp_path / 'data' / 'red' / 'broken.jpg')] * 2
  del one['plot'], two['plot']
  assert _without_speed(two) == one


def test_retrieval_on_two_processes_matches_one(workdir, tmp_path):
  paths = write_images(str(tmp_path / 'data'), SIZES)
  rows = [{'image': os.path.basename(p), 'captions': [f'image {i}', f'picture {i}']}
          for i, p in enumerate(paths)]
  rows.insert(4, {'image': 'missing.jpg', 'captions': ['gone']})  # process 1's
  data = tmp_path / 'data' / 'pairs.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  args = ['--checkpoint', workdir, '--data', str(data), '--ks', '1,2',
          '--no_progress']
  load_script('retrieval').main(args + ['--output', str(tmp_path / 'one.json')])
  _run_two_processes('retrieval', args + ['--output', str(tmp_path / 'two.json')])
  one = _without_speed(_read_json(tmp_path / 'one.json'))
  assert one['num_images'] == 5 and one['num_failed'] == 1
  assert _without_speed(_read_json(tmp_path / 'two.json')) == one


def _folder(out):
  """{relative path: contents} of an export folder: arrays, tables, JSON."""
  files = {}
  for root, _, names in os.walk(out):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, out)
      if name.endswith('.npy'):
        files[rel] = np.load(path)
      elif name.endswith('.parquet'):
        files[rel] = pq.read_table(path).to_pydict()
      else:
        with open(path, encoding='utf-8') as f:
          files[rel] = f.read()
  return files


def test_export_on_two_processes_writes_one_process_folder(workdir, tmp_path):
  # Six records, one missing (process 1's block of the first part), in parts
  # of four: the second part gives each process one record.
  paths = write_images(str(tmp_path / 'photos'), SIZES)
  paths.insert(3, str(tmp_path / 'photos' / 'missing.jpg'))
  (tmp_path / 'list.jsonl').write_text(''.join(
      json.dumps({'image': p, 'caption': f'photo number {i}'}) + '\n'
      for i, p in enumerate(paths)))
  args = ['--checkpoint', workdir, '--list', str(tmp_path / 'list.jsonl'),
          '--part_size', '4', '--dtype', 'float32', '--no_progress']
  load_script('export_embeddings').main(
      args + ['--output_dir', str(tmp_path / 'one')])
  _run_two_processes('export_embeddings',
                     args + ['--output_dir', str(tmp_path / 'two')])
  one, two = _folder(tmp_path / 'one'), _folder(tmp_path / 'two')
  assert sorted(two) == sorted(one)
  assert 'text_emb/text_emb_1.npy' in one
  assert len(one['metadata/metadata_0.parquet']['index']) == 3
  for rel, value in one.items():
    if rel.endswith('.npy'):
      np.testing.assert_allclose(two[rel], value, atol=1e-6, err_msg=rel)
    else:
      assert two[rel] == value, rel

  # A rerun finds the folder complete; other settings are refused on both
  # processes, the folder untouched.
  outputs = _run_two_processes('export_embeddings',
                               args + ['--output_dir', str(tmp_path / 'two')])
  assert all(' 0 new this run' in out for _, out, _ in outputs)
  args[args.index('float32')] = 'float16'
  outputs = _run_two_processes(
      'export_embeddings', args + ['--output_dir', str(tmp_path / 'two')],
      check=False)
  for status, _, err in outputs:
    assert status == 2 and 'holds an export with other settings' in err, err
  assert _folder(tmp_path / 'two').keys() == two.keys()
  np.testing.assert_array_equal(_folder(tmp_path / 'two')['img_emb/img_emb_0.npy'],
                                two['img_emb/img_emb_0.npy'])
