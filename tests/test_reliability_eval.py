"""Evaluation and export faults: unreadable checkpoints, file names that are
not UTF-8, an index queried with other weights, a folder that grows,
malformed inputs, and one-line user errors from the real scripts."""

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit.evaluate import cli
from lit_navit.evaluate import datasets
from lit_navit.evaluate import export
import tiny_config
from eval_helpers import init_params, tiny_embedder, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16), (20, 20)]


def _script(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, 'eval', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _save(workdir, steps):
  """Checkpoints of the tiny model at `steps`, params shifted by the step."""
  config = tiny_config.get_config()
  params = init_params(config.model, config.input.text_len)
  saver = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  for step in steps:
    saver.save(step, {'params': jax.tree.map(lambda x, s=step: x + s, params)},
               {}, config)
  saver.close()
  return {step: jax.tree.map(lambda x, s=step: np.asarray(x + s), params)
          for step in steps}


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)


@pytest.fixture(name='two_steps', scope='module')
def _two_steps(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, _save(workdir, (1, 2))


def _copy(workdir, tmp_path):
  copy = str(tmp_path / 'run')
  subprocess.run(['cp', '-r', workdir, copy], check=True)
  return copy, os.path.join(copy, 'checkpoints', '2')


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))


def _truncate_data(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, 'state'))
           for n in names if os.sep + 'd' + os.sep in os.path.join(d, n)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _bad_config(step_dir):
  with open(os.path.join(step_dir, 'config', 'metadata'), 'w', encoding='utf-8') as f:
    f.write('{"model": ')


@pytest.mark.parametrize('damage', [_delete_manifest, _truncate_data, _bad_config])
def test_eval_falls_back_from_an_unreadable_newest_step(two_steps, tmp_path, damage,
                                                         caplog):
  workdir, params = two_steps
  copy, step_dir = _copy(workdir, tmp_path)
  damage(step_dir)
  with caplog.at_level(logging.INFO, logger='lit_navit'):
    _, loaded = checkpoint.load_for_inference(copy)
  _assert_equal(loaded, params[1])
  assert 'step 2' in caplog.text and 'unreadable' in caplog.text
  assert 'using checkpoint step 1' in caplog.text
  # Named explicitly, the damaged step is an error that names it.
  with pytest.raises(checkpoint.UnreadableCheckpoint, match=step_dir):
    checkpoint.load_for_inference(step_dir)


def test_eval_with_no_readable_step_lists_them(two_steps, tmp_path):
  workdir, _ = two_steps
  copy, step_dir = _copy(workdir, tmp_path)
  _delete_manifest(step_dir)
  _bad_config(os.path.join(copy, 'checkpoints', '1'))
  with pytest.raises(checkpoint.UnreadableCheckpoint,
                     match=r'step 2: .*; step 1: .*invalid JSON'):
    checkpoint.load_for_inference(copy)


def test_export_keeps_names_that_are_not_utf8(tmp_path):
  folder = tmp_path / 'images'
  paths = write_images(str(folder), SIZES[:3])
  latin1 = os.path.join(os.fsencode(str(folder)), b'caf\xe9.jpg')
  os.rename(paths[1], latin1)
  broken = os.path.join(os.fsencode(str(folder)), b'bad\xff.jpg')
  with open(broken, 'wb') as f:
    f.write(b'not an image')
  out = str(tmp_path / 'export')
  source = datasets.ImageFiles(datasets.find_images(str(folder)))
  summary = export.export(tiny_embedder(), source, out, part_size=2,
                          key_column='image_path', progress=False)
  assert summary['num_exported'] == 3 and summary['num_failed'] == 1
  rows = [row for n in ('0', '1') for row in pq.read_table(
      os.path.join(out, 'metadata', f'metadata_{n}.parquet')).to_pylist()]
  exact = {row['path_bytes'] for row in rows}
  assert latin1 in exact
  assert os.fsencode(paths[0]) in exact and os.fsencode(paths[2]) in exact
  shown = [row['image_path'] for row in rows if row['path_bytes'] == latin1]
  assert shown == [os.path.join(str(folder), 'caf\ufffd.jpg')]
  # The failure keeps its exact name too (surrogate escapes in JSON).
  with open(os.path.join(out, 'failed.jsonl'), encoding='utf-8') as f:
    failed = [json.loads(line) for line in f]
  assert [os.fsencode(row['key']) for row in failed] == [broken]
  # Querying the exported embedding of the Latin-1 file finds that file.
  emb, _ = tiny_embedder().images(datasets.ImageFiles([os.fsdecode(latin1)]),
                                  progress=False)
  hit = export.query(out, emb[0], k=1)[0]
  assert hit['path_bytes'] == latin1
  # So does query.py's JSON output.
  assert os.fsencode(json.loads(json.dumps(cli.to_json(hit)))['path_bytes']) == latin1


def test_export_appends_a_grown_folder_and_keeps_done_parts(tmp_path):
  folder = str(tmp_path / 'images')
  write_images(os.path.join(folder, 'b'), SIZES[:4])
  out = str(tmp_path / 'export')
  embedder = tiny_embedder()

  def run(**kwargs):
    return export.export(embedder, datasets.ImageFiles(datasets.find_images(folder)),
                         out, part_size=3, key_column='image_path', progress=False,
                         **kwargs)

  first = run()
  assert first['num_new'] == 4 and first['parts_written'] == 2
  parts_before = {n: os.stat(os.path.join(out, 'img_emb', n)).st_mtime_ns
                  for n in os.listdir(os.path.join(out, 'img_emb'))}
  # Two new images, one sorting before every old one.
  new = write_images(os.path.join(folder, 'a'), SIZES[4:6], seed=1)
  second = run()
  assert second['num_new'] == 2 and second['parts_written'] == 1
  assert second['parts_skipped'] == 2 and second['num_exported'] == 6
  for name, mtime in parts_before.items():
    assert os.stat(os.path.join(out, 'img_emb', name)).st_mtime_ns == mtime
  appended = pq.read_table(os.path.join(out, 'metadata', 'metadata_2.parquet'))
  assert appended.column('image_path').to_pylist() == new
  # Each new image is found by its own embedding.
  emb, _ = embedder.images(datasets.ImageFiles(new), progress=False)
  assert [hits[0]['image_path'] for hits in export.query(out, emb, k=1)] == new
  # Nothing more to do; a rewritten file is embedded again.
  assert run()['num_new'] == 0
  write_images(os.path.join(folder, 'a'), SIZES[4:5], seed=2)
  assert run()['num_new'] == 1
  # Other weights or settings still need a new folder.
  other = tiny_embedder()
  other.params = jax.tree.map(lambda x: x + 1, other.params)
  with pytest.raises(ValueError, match='params_sha256'):
    export.export(other, datasets.ImageFiles(datasets.find_images(folder)), out,
                  part_size=3, key_column='image_path', progress=False)
  with pytest.raises(ValueError, match='dtype'):
    run(dtype='float32')


def test_query_refuses_an_index_of_other_weights(tmp_path):
  exported_from, other = str(tmp_path / 'a'), str(tmp_path / 'b')
  _save(exported_from, (1,))
  _save(other, (5,))
  write_images(str(tmp_path / 'photos'), SIZES[:3])
  out = str(tmp_path / 'export')
  _script('export_embeddings').main([
      '--checkpoint', exported_from, '--images', str(tmp_path / 'photos'),
      '--output_dir', out, '--no_progress'])
  query = ['--index', out, '--text', 'a photo', '--k', '2']
  with pytest.raises(ValueError) as error:
    _script('query').main(['--checkpoint', other] + query)
  message = str(error.value)
  assert exported_from in message and other in message
  assert '--allow_other_checkpoint' in message
  results = _script('query').main(['--checkpoint', other, '--allow_other_checkpoint']
                                  + query)
  assert len(results[0]['results']) == 2
  assert len(_script('query').main(['--checkpoint', exported_from] + query)[0][
      'results']) == 2


def test_malformed_dataset_files_are_named(tmp_path):
  names = tmp_path / 'names.json'
  names.write_text('["cat",\n "dog"\n')
  with pytest.raises(ValueError, match=r'names.json line 3 column 1: invalid JSON'):
    datasets.read_classnames(str(names))
  karpathy = tmp_path / 'coco.json'
  karpathy.write_text('{"images": [}')
  with pytest.raises(ValueError, match=r'coco.json line 1 column 13: invalid JSON'):
    datasets.karpathy_json(str(karpathy), str(tmp_path))
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text('{"image": "a.jpg", "caption": "one"}\n'
                   '{"image": "b.jpg", "caption": ["two", "three"]}\n')
  with pytest.raises(ValueError, match=r'pairs.jsonl line 2: .*"caption"'):
    datasets.jsonl_retrieval(str(pairs))


def test_progress_bar_counts_failed_images_as_done(tmp_path, capsys):
  paths = write_images(str(tmp_path), SIZES[:3])
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8\xff truncated')
  tiny_embedder().images(datasets.ImageFiles(paths + [str(broken)]), progress=True)
  bar = capsys.readouterr().err.split('\r')[-1]
  assert '100%' in bar and '4/4' in bar and 'failed=1' in bar


# What an installed libtpu prints when a process's JAX starts on a machine
# without a TPU (seen when a TPU plan test ran earlier in the same worker):
# start-up noise, not the tracebacks this file is about.
LIBTPU_STARTUP = re.compile(r'(Failed to find host bounds for accelerator'
                            r'|WARNING: Logging before InitGoogle'
                            r'|E0000 .*(libtpu|TPU_WORKER_HOSTNAMES)'
                            r'|=== Source Location Trace: ==='
                            r'|learning/\S+\.cc:\d+)')


def _run_script(name, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'eval', f'{name}.py'),
                         *args], env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow
def test_scripts_report_user_errors_in_one_line(two_steps, tmp_path):
  workdir, _ = two_steps
  copy, step_dir = _copy(workdir, tmp_path)
  _delete_manifest(step_dir)
  names = tmp_path / 'names.json'
  names.write_text('["a", "b"')
  (tmp_path / 'data' / 'a').mkdir(parents=True)
  (tmp_path / 'data' / 'b').mkdir()
  write_images(str(tmp_path / 'data' / 'a'), SIZES[:1])
  write_images(str(tmp_path / 'data' / 'b'), SIZES[1:2])
  args = ['--checkpoint', copy, '--imagenet', str(tmp_path / 'data'),
          '--classnames', str(names), '--no_progress']
  proc = _run_script('zero_shot_imagenet', *args)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'names.json line 1' in errors[0]
  assert 'Traceback' not in proc.stderr
  # The workdir's damaged newest step was passed over, and said so.
  assert 'using checkpoint step 1' in proc.stderr
  assert 'Metadata file does not exist' not in proc.stderr
  debug = _run_script('zero_shot_imagenet', *args, '--debug')
  assert debug.returncode != 0 and 'Traceback' in debug.stderr
  # A damaged step named explicitly: one line naming it.
  proc = _run_script('zero_shot_imagenet', '--checkpoint', step_dir,
                     '--folder', str(tmp_path / 'data'), '--no_progress')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert f'checkpoint {step_dir} is unreadable' in proc.stderr
  assert 'has no readable metadata' in proc.stderr


@pytest.mark.slow
def test_a_script_passing_over_a_truncated_step_prints_no_tracebacks(two_steps, tmp_path):
  """The reads a failed restore abandons end later, each once printing a
  traceback (a closed event loop, a collected coroutine, an unretrieved
  task or future); which of them and how many varies from run to run."""
  copy, step_dir = _copy(two_steps[0], tmp_path)
  _truncate_data(step_dir)
  (tmp_path / 'data' / 'a').mkdir(parents=True)
  write_images(str(tmp_path / 'data' / 'a'), SIZES[:2])
  for _ in range(3):
    proc = _run_script('zero_shot_imagenet', '--checkpoint', copy,
                       '--folder', str(tmp_path / 'data'), '--no_progress',
                       '--output', str(tmp_path / 'out.json'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines()
             if not LIBTPU_STARTUP.match(line)]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert 'step 2' in lines[0] and 'unreadable' in lines[0]
    assert 'using checkpoint step 1' in lines[1]


def test_only_abandoned_read_errors_are_dropped_from_asyncio_logs():
  keep = checkpoint._UnretrievedOrbaxRead().filter  # pylint: disable=protected-access

  def record(message, error):
    return logging.LogRecord('asyncio', logging.ERROR, __file__, 1, message, (),
                             (type(error), error, error.__traceback__))

  tensorstore_error = ValueError('OUT_OF_RANGE: Error reading "a/0.0" in OCDBT database')
  assert not keep(record('Future exception was never retrieved\nfuture: <Future>',
                         tensorstore_error))
  try:
    raise ValueError('a mistake of our own')
  except ValueError as e:
    ours = e
  assert keep(record('Task exception was never retrieved\nfuture: <Task>', ours))
  assert keep(record('Exception in callback', tensorstore_error))


def _without_defaults(saved, default):
  """`saved` less every key whose value is today's default: a config
  written before those keys existed."""
  kept = {}
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(default.get(key), dict):
      value = _without_defaults(value, default[key])
      if value:
        kept[key] = value
    elif key not in default or value != default[key]:
      kept[key] = value
  return kept


def test_a_checkpoint_saved_before_todays_keys_loads_and_exports(two_steps, tmp_path):
  workdir, params = two_steps
  copy, step_dir = _copy(workdir, tmp_path)
  config_path = os.path.join(step_dir, 'config', 'metadata')
  with open(config_path, encoding='utf-8') as f:
    saved = json.load(f)
  default = checkpoint.config_to_json(config_lib.default_config())
  old = _without_defaults(saved, default)
  assert 'cpu_compiler_options' not in old and 'object_scale' not in old['input']['source']
  assert 'evals' not in old and 'mode' not in old['input']['resolution']  # groups too
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(old, f)
  config, loaded = checkpoint.load_for_inference(step_dir)
  assert checkpoint.config_to_json(config) == saved
  _assert_equal(loaded, params[2])
  # The export script reads it as it reads today's checkpoints.
  write_images(str(tmp_path / 'photos'), SIZES[:3])
  outputs = {}
  for name, path in (('today', os.path.join(workdir, 'checkpoints', '2')), ('old', step_dir)):
    outputs[name] = str(tmp_path / name)
    _script('export_embeddings').main([
        '--checkpoint', path, '--images', str(tmp_path / 'photos'),
        '--output_dir', outputs[name], '--no_progress'])
  embeddings = {name: np.concatenate([np.load(os.path.join(out, 'img_emb', n))
                                      for n in sorted(os.listdir(os.path.join(out, 'img_emb')))])
                for name, out in outputs.items()}
  assert embeddings['today'].shape[0] == 3
  np.testing.assert_array_equal(embeddings['old'], embeddings['today'])


def _index_rows(out):
  """Every metadata row of an export, in part order."""
  names = sorted(os.listdir(os.path.join(out, 'metadata')),
                 key=lambda n: int(n.split('_')[1].split('.')[0]))
  return [path for name in names for path in
          pq.read_table(os.path.join(out, 'metadata', name)).column('image_path').to_pylist()]


def test_an_incremental_export_holds_one_row_per_current_image(tmp_path, monkeypatch):
  folder = str(tmp_path / 'images')
  paths = write_images(os.path.join(folder, 'b'), SIZES[:4])
  out = str(tmp_path / 'export')
  embedder = tiny_embedder()

  def run():
    return export.export(embedder, datasets.ImageFiles(datasets.find_images(folder)),
                         out, part_size=3, key_column='image_path', progress=False)

  run()
  write_images(os.path.join(folder, 'a'), SIZES[4:6], seed=1)
  touched, deleted = paths[1], paths[2]
  mtime = os.stat(touched).st_mtime_ns
  os.utime(touched, ns=(mtime, mtime + 10**9))  # same bytes, a new mtime
  os.remove(deleted)
  current = datasets.find_images(folder)
  # Killed after writing the rewritten part, before removing the old one.
  remove_part = export._remove_part  # pylint: disable=protected-access
  monkeypatch.setattr(export, '_remove_part', lambda *args: sys.exit('killed'))
  with pytest.raises(SystemExit):
    run()
  monkeypatch.setattr(export, '_remove_part', remove_part)
  summary = run()
  assert sorted(_index_rows(out)) == sorted(current)  # one row each
  assert summary['num_images'] == summary['num_exported'] == 5
  assert summary['num_failed'] == 0
  # Each image is found by its own embedding (rows and metadata aligned),
  # once: its runner-up is another image.
  emb, _ = embedder.images(datasets.ImageFiles(current), progress=False)
  for path, hits in zip(current, export.query(out, emb, k=2)):
    assert hits[0]['image_path'] == path and hits[1]['image_path'] != path
  again = run()
  assert (again['num_new'], again['num_dropped'], again['num_exported']) == (0, 0, 5)


def test_export_refuses_a_folder_it_did_not_make(tmp_path):
  folder = str(tmp_path / 'images')
  write_images(folder, SIZES[:2])
  out = tmp_path / 'theirs'
  (out / 'img_emb').mkdir(parents=True)
  (out / 'img_emb' / 'img_emb_0.npy').write_bytes(b'their embeddings')
  with pytest.raises(FileExistsError, match=f'{out} is not empty and holds no export'):
    export.export(tiny_embedder(), datasets.ImageFiles(datasets.find_images(folder)),
                  str(out), key_column='image_path', progress=False)
  assert (out / 'img_emb' / 'img_emb_0.npy').read_bytes() == b'their embeddings'
  assert sorted(p.name for p in out.rglob('*')) == ['img_emb', 'img_emb_0.npy']


class _Planted:
  """Unpickling this writes a file: the code a hostile .npy would run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_what_we_read_from_others_runs_no_code_and_writes_nowhere_else(tmp_path):
  import data_fixtures  # pylint: disable=import-outside-toplevel
  from lit_navit.data import sources  # pylint: disable=import-outside-toplevel
  images = write_images(str(tmp_path / 'images'), SIZES[:2])
  members = []
  for n, (name, image) in enumerate(zip(['../../escape/a', '/abs/b'], images)):
    with open(image, 'rb') as f:
      members += [(f'{name}.jpg', f.read()), (f'{name}.txt', f'caption {n}'.encode())]
  tar = data_fixtures.write_tar(tmp_path / 'hostile.tar', members)
  out = tmp_path / 'out' / 'export'
  summary = export.export(tiny_embedder(), sources.WebDatasetSource(tar), str(out),
                          progress=False)
  assert summary['num_exported'] == 2
  # Member names are data (metadata keys), never paths written to.
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hostile.tar', 'images', 'out']
  assert [p.name for p in (tmp_path / 'out').iterdir()] == ['export']
  assert not os.path.exists('/abs')
  # An export whose .npy holds pickled objects is refused, and runs nothing.
  marker = tmp_path / 'ran'
  emb_file = next((out / 'img_emb').iterdir())
  np.save(emb_file, np.array([_Planted(str(marker))], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match='allow_pickle|Python objects'):
    export.query(str(out), np.ones(tiny_embedder().dim, np.float32))
  assert not marker.exists()
