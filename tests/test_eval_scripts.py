"""The eval/ scripts end to end on a tiny checkpoint written to tmp_path."""

import importlib.util
import json
import os

import pytest

from lit_navit import checkpoint
from lit_navit.evaluate import demo_eval
import tiny_config
from eval_helpers import init_params, write_images

EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'eval')
SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16), (20, 20)]

pytestmark = pytest.mark.slow


def _script(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(EVAL_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(name='workdir', scope='module')
def _workdir(tmp_path_factory):
  """A workdir holding one checkpoint of a randomly initialised tiny model."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config.get_config()
  params = init_params(config.model, config.input.text_len)
  saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  saver.save(1, {'params': params}, {}, config)
  saver.close()
  return workdir


def test_zero_shot_script_evaluates_each_budget_and_plots(workdir, tmp_path):
  for n, name in enumerate(('red_circle', 'blue_square', 'green_star')):
    write_images(str(tmp_path / 'data' / name), SIZES[:2], seed=n)
  templates = tmp_path / 'templates.txt'
  templates.write_text('a photo of a {}.\na drawing of a {}.\n')
  output = str(tmp_path / 'zs.json')
  _script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--folder', str(tmp_path / 'data'),
      '--templates', str(templates), '--max_tokens', '8,16', '--output', output,
      '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert [r['max_tokens'] for r in results['results']] == [8, 16]
  assert results['num_classes'] == 3 and results['num_templates'] == 2
  for run in results['results']:
    assert 0 <= run['top1'] <= run['top5'] == 1.0  # top-5 of 3 classes
    assert run['num_images'] == 6
    assert [c['class'] for c in run['per_class']] == ['blue square', 'green star',
                                                      'red circle']
  assert os.path.getsize(str(tmp_path / 'zs.png')) > 0


def test_zero_shot_script_and_eval_hook_agree_on_synthetic_data(workdir, tmp_path):
  output = str(tmp_path / 'synthetic.json')
  _script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--synthetic', '24', '--batch_rows', '8',
      '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    script_top1 = json.load(f)['results'][0]['top1']
  config, params = checkpoint.load_for_inference(workdir)
  hook = demo_eval.synthetic_metrics(config, params, 24, batch_rows=8)
  assert script_top1 == hook['zero_shot/top1']


def test_retrieval_script_lists_a_missing_image(workdir, tmp_path):
  paths = write_images(str(tmp_path / 'data'), SIZES[:3])
  rows = [{'image': os.path.basename(p), 'captions': [f'image {i}', f'picture {i}']}
          for i, p in enumerate(paths)]
  rows.append({'image': 'missing.jpg', 'captions': ['gone']})
  data = tmp_path / 'data' / 'pairs.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  output = str(tmp_path / 'retrieval.json')
  _script('retrieval').main(['--checkpoint', workdir, '--data', str(data),
                             '--ks', '1,3,6', '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert results['num_images'] == 3 and results['num_texts'] == 6
  assert results['num_failed'] == 1
  assert results['failed'][0]['key'].endswith('missing.jpg')
  # Whatever the (random) model: every image is within 3, every caption within 6.
  assert results['text_to_image/R@3'] == 1.0 and results['image_to_text/R@6'] == 1.0
  assert 0 <= results['text_to_image/R@1'] <= 1


def test_export_then_query_scripts(workdir, tmp_path):
  paths = write_images(str(tmp_path / 'photos' / 'a'), SIZES)
  out = str(tmp_path / 'export')
  summary = _script('export_embeddings').main([
      '--checkpoint', workdir, '--images', str(tmp_path / 'photos'),
      '--output_dir', out, '--part_size', '4', '--dtype', 'float32',
      '--no_progress'])
  assert summary['num_exported'] == 6 and summary['parts_written'] == 2
  assert sorted(os.listdir(os.path.join(out, 'metadata'))) == [
      'metadata_0.parquet', 'metadata_1.parquet']
  output = str(tmp_path / 'query.json')
  queries = _script('query').main([
      '--checkpoint', workdir, '--index', out, '--image', paths[4],
      '--text', 'a red circle', '--k', '3', '--output', output])
  assert [q.get('text', q.get('image')) for q in queries] == ['a red circle', paths[4]]
  assert queries[1]['results'][0]['image_path'] == paths[4]
  assert len(queries[0]['results']) == 3
