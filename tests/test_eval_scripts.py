"""The eval/ scripts end to end on a tiny checkpoint written to tmp_path.

Expected numbers come from the checkpoint's own embeddings (an Embedder made
the way the scripts make theirs) and metrics computed here from scratch.
"""

import json
import os

import matplotlib.figure
import numpy as np
import pyarrow.parquet as pq
import pytest

from lit_navit import checkpoint
from lit_navit.evaluate import datasets
from lit_navit.evaluate import embed
from lit_navit.evaluate import imagenet_metadata
import data_fixtures
from eval_helpers import load_script, write_checkpoint, write_images

SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16), (20, 20), (8, 40),
         (33, 17)]

pytestmark = pytest.mark.slow



@pytest.fixture(name='workdir', scope='module')
def _workdir(tmp_path_factory):
  """A workdir holding one checkpoint of a randomly initialised tiny model."""
  return write_checkpoint(str(tmp_path_factory.mktemp('run')))


def _embedder(workdir, **kwargs):
  """An Embedder of the checkpoint, made as the scripts make theirs."""
  config, params = checkpoint.load_for_inference(workdir)
  return embed.Embedder.from_config(config, params, 64, **kwargs)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rank_of(scores, target):
  """Rank (0 = first) of column target[i] in row i, in a stable descending sort."""
  order = np.argsort(-scores, axis=1, kind='stable')
  return np.argmax(order == np.asarray(target)[:, None], axis=1)


def _expected_top_k(embedder, source, labels, classnames, templates, ks=(1, 5)):
  """Top-K accuracy from scratch: prompt embeddings averaged per class."""
  image_emb, failed = embedder.images(source, progress=False)
  assert not failed
  prompts = [t.format(c) for c in classnames for t in templates]
  text_emb = _unit(embedder.texts(prompts)).reshape(len(classnames), len(templates), -1)
  rank = _rank_of(image_emb @ _unit(text_emb.mean(axis=1)).T, labels)
  return {f'top{k}': float(np.mean(rank < k)) for k in ks}


def _capture_plots(monkeypatch):
  """The (label, x, y) of every line of every figure saved from now on."""
  lines = []
  save = matplotlib.figure.Figure.savefig

  def savefig(fig, *args, **kwargs):
    lines.extend((line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                 for ax in fig.axes for line in ax.lines)
    return save(fig, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', savefig)
  return lines


def test_zero_shot_script_evaluates_each_budget_and_plots(workdir, tmp_path, monkeypatch):
  names = ['red_circle', 'blue_square', 'green_star', 'pink_moon', 'grey_cube',
           'cyan_ring', 'black_dot', 'white_cross']
  for n, name in enumerate(names):
    write_images(str(tmp_path / 'data' / name), [SIZES[n]], seed=n)
  templates = tmp_path / 'templates.txt'
  templates.write_text('a photo of a {}.\na drawing of a {}.\n')
  output = str(tmp_path / 'zs.json')
  plotted = _capture_plots(monkeypatch)
  load_script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--folder', str(tmp_path / 'data'),
      '--templates', str(templates), '--max_tokens', '8,16', '--output', output,
      '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert results['num_classes'] == 8 and results['num_templates'] == 2
  assert [r['max_tokens'] for r in results['results']] == [8, 16]
  data = datasets.image_folder(str(tmp_path / 'data'))
  classnames = sorted(n.replace('_', ' ') for n in names)
  for run in results['results']:
    expected = _expected_top_k(_embedder(workdir, max_tokens=run['max_tokens']),
                               data.source, data.labels, classnames,
                               ['a photo of a {}.', 'a drawing of a {}.'])
    assert (run['top1'], run['top5']) == (expected['top1'], expected['top5'])
    assert run['num_images'] == 8
    assert [c['class'] for c in run['per_class']] == classnames
  # The plot: accuracy (%) against the budgets, one line each for top-1 and top-5.
  assert os.path.getsize(str(tmp_path / 'zs.png')) > 0
  runs = results['results']
  assert plotted == [
      ('top-1', [8, 16], [pytest.approx(100 * r['top1']) for r in runs]),
      ('top-5', [8, 16], [pytest.approx(100 * r['top5']) for r in runs])]


def test_zero_shot_script_reads_an_imagenet_folder_at_another_patch_size(
    workdir, tmp_path):
  # Two classes of the 1000, five images; --max_images 3 picks images 0, 2, 4.
  wnids = [imagenet_metadata.WNIDS[3], imagenet_metadata.WNIDS[7]]
  write_images(str(tmp_path / 'val' / wnids[0]), SIZES[:2], seed=0)
  write_images(str(tmp_path / 'val' / wnids[1]), SIZES[2:5], seed=1)
  templates = tmp_path / 'templates.txt'
  templates.write_text('a photo of a {}.\n')
  output = str(tmp_path / 'zs.json')
  load_script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--imagenet', str(tmp_path), '--patch_size', '16',
      '--max_images', '3', '--templates', str(templates), '--output', output,
      '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert results['patch_size'] == 16 and results['num_classes'] == 1000
  run = results['results'][0]
  assert run['num_images'] == 3
  counts = {c['class']: c['count'] for c in run['per_class'] if c['count']}
  names = imagenet_metadata.CLASSNAMES
  assert counts == {names[3]: 1, names[7]: 2}
  data = datasets.imagenet_folder(str(tmp_path))
  subset = datasets.Subset(data.source, np.asarray([0, 2, 4]))
  expected = _expected_top_k(_embedder(workdir, patch_size=16), subset,
                             data.labels[[0, 2, 4]], names, ['a photo of a {}.'])
  assert (run['top1'], run['top5']) == (expected['top1'], expected['top5'])


def test_zero_shot_script_reads_tfrecord_labels(workdir, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths = write_images(str(tmp_path / 'images'), SIZES[:4])
  labels = [5, 0, 5, 2]
  with tf.io.TFRecordWriter(str(tmp_path / 'val.tfrecord')) as writer:
    for path, label in zip(paths, labels):
      with open(path, 'rb') as f:
        image = f.read()
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
          'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      })).SerializeToString())
  classnames = tmp_path / 'classes.txt'
  classnames.write_text(''.join(f'thing {i}\n' for i in range(1000)))
  templates = tmp_path / 'templates.txt'
  templates.write_text('{}\n')
  output = str(tmp_path / 'zs.json')
  load_script('zero_shot_imagenet').main([
      '--checkpoint', workdir, '--tfrecord', str(tmp_path / 'val.tfrecord'),
      '--classnames', str(classnames), '--templates', str(templates),
      '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    run = json.load(f)['results'][0]
  counts = {c['class']: c['count'] for c in run['per_class'] if c['count']}
  assert counts == {'thing 0': 1, 'thing 2': 1, 'thing 5': 2}
  expected = _expected_top_k(_embedder(workdir), datasets.ImageFiles(paths), labels,
                             [f'thing {i}' for i in range(1000)], ['{}'])
  assert (run['top1'], run['top5']) == (expected['top1'], expected['top5'])


def test_retrieval_script_recall_and_a_missing_image(workdir, tmp_path, capsys):
  paths = write_images(str(tmp_path / 'data'), SIZES[:6])
  captions = [[f'image {i}', f'picture {i}'] for i in range(6)]
  rows = [{'image': os.path.basename(p), 'captions': c} for p, c in zip(paths, captions)]
  rows.insert(2, {'image': 'missing.jpg', 'captions': ['gone']})
  data = tmp_path / 'data' / 'pairs.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  output = str(tmp_path / 'retrieval.json')
  step_dir = os.path.join(workdir, 'checkpoints', '1')  # a step, not a workdir
  load_script('retrieval').main(['--checkpoint', step_dir, '--data', str(data),
                             '--ks', '1,2,5', '--output', output, '--no_progress'])
  with open(output, encoding='utf-8') as f:
    results = json.load(f)
  assert results['num_images'] == 6 and results['num_texts'] == 12
  assert results['num_failed'] == 1
  assert results['failed'][0]['key'].endswith('missing.jpg')
  assert ('evaluated 6 images and 12 captions; dropped 1 images that could not '
          'be read, with their 1 captions') in capsys.readouterr().out

  # Recall from scratch over the six images that exist and their captions.
  embedder = _embedder(workdir)
  image_emb, _ = embedder.images(datasets.ImageFiles(paths), progress=False)
  text_emb = embedder.texts([c for pair in captions for c in pair])
  owner = np.repeat(np.arange(6), 2)
  t2i_rank = _rank_of(text_emb @ image_emb.T, owner)
  scores = image_emb @ text_emb.T
  i2t_rank = np.min([_rank_of(scores, 2 * np.arange(6) + j) for j in (0, 1)], axis=0)
  for k in (1, 2, 5):
    assert results[f'text_to_image/R@{k}'] == pytest.approx(np.mean(t2i_rank < k))
    assert results[f'image_to_text/R@{k}'] == pytest.approx(np.mean(i2t_rank < k))


def test_retrieval_script_refuses_what_it_cannot_evaluate(workdir, tmp_path):
  step_dir = os.path.join(workdir, 'checkpoints', '1')
  retrieval = load_script('retrieval')

  def run(data, *flags):
    return retrieval.main(['--checkpoint', step_dir, '--data', str(data),
                           '--no_progress', *flags])

  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(ValueError, match='holds no image-caption pairs'):
    run(empty)
  gone = tmp_path / 'gone.jsonl'
  gone.write_text(json.dumps({'image': 'missing.jpg', 'captions': ['gone']}) + '\n')
  with pytest.raises(ValueError, match='none of the 1 images .* could be read'):
    run(gone)
  for ks in ('0,-1', '1,x', ''):
    with pytest.raises(ValueError, match='--ks'):
      run(gone, '--ks', ks)
  karpathy = tmp_path / 'dataset_coco.json'
  karpathy.write_text(json.dumps({'images': [
      {'filename': 'a.jpg', 'split': 'test', 'sentences': [{'raw': 'a'}]}]}))
  with pytest.raises(ValueError, match=r'image folder \(--images_root\) not given'):
    run(karpathy)


def _read_export(out):
  """(image embeddings, text embeddings or None, metadata) of all parts."""
  def stack(kind):
    folder = os.path.join(out, f'{kind}_emb')
    if not os.path.isdir(folder):
      return None
    return np.concatenate([np.load(os.path.join(folder, n))
                           for n in sorted(os.listdir(folder))])
  metadata = {}
  for name in sorted(os.listdir(os.path.join(out, 'metadata'))):
    for key, values in pq.read_table(os.path.join(out, 'metadata', name)) \
        .to_pydict().items():
      metadata.setdefault(key, []).extend(values)
  return stack('img'), stack('text'), metadata


def test_export_script_inputs(workdir, tmp_path):
  """--list, --wds and --tfrecord give the same embeddings as the images
  themselves; --no_text leaves the captions out."""
  paths = write_images(str(tmp_path / 'photos'), SIZES[:5])
  captions = [f'photo number {i}' for i in range(5)]
  images = []
  for path in paths:
    with open(path, 'rb') as f:
      images.append(f.read())
  keys = [f'k{i:03d}' for i in range(5)]
  (tmp_path / 'list.jsonl').write_text(''.join(
      json.dumps({'image': p, 'caption': c}) + '\n' for p, c in zip(paths, captions)))
  data_fixtures.write_tar(tmp_path / 'shard-0.tar', [
      member for key, image, caption in zip(keys, images, captions)
      for member in ((f'{key}.jpg', image), (f'{key}.txt', caption.encode()))])
  data_fixtures.write_tfrecord(tmp_path / 'shard-0.tfrecord', [
      data_fixtures.make_example({'jpg': image, 'txt': caption, 'key': key})
      for key, image, caption in zip(keys, images, captions)])

  embedder = _embedder(workdir, resize='native')
  expected_img, failed = embedder.images(datasets.ImageFiles(paths), progress=False)
  assert not failed
  expected_text = embedder.texts(captions)
  tar, tfrecord = str(tmp_path / 'shard-0.tar'), str(tmp_path / 'shard-0.tfrecord')
  for flag, value, key_column, key_values in (
      ('--list', tmp_path / 'list.jsonl', 'image_path', paths),
      ('--wds', tar, 'key', [f'{tar}:{key}' for key in keys]),  # shard:key
      ('--tfrecord', tfrecord, 'key',  # shard#record:key
       [f'{tfrecord}#{n}:{key}' for n, key in enumerate(keys)])):
    out = str(tmp_path / f'export{flag}')
    no_text = ['--no_text'] if flag == '--tfrecord' else []
    summary = load_script('export_embeddings').main([
        '--checkpoint', workdir, flag, str(value), '--output_dir', out,
        '--part_size', '3', '--dtype', 'float32', '--no_progress', *no_text])
    assert summary['num_exported'] == 5 and summary['parts_written'] == 2, flag
    img, text, metadata = _read_export(out)
    np.testing.assert_allclose(img, expected_img, atol=1e-6, err_msg=flag)
    assert metadata[key_column] == key_values, flag
    if no_text:
      assert text is None and 'caption' not in metadata
    else:
      np.testing.assert_allclose(text, expected_text, atol=1e-6, err_msg=flag)
      assert metadata['caption'] == captions, flag


def test_export_then_query_scripts(workdir, tmp_path):
  paths = write_images(str(tmp_path / 'photos' / 'a'), SIZES[:6])
  out = str(tmp_path / 'export')
  summary = load_script('export_embeddings').main([
      '--checkpoint', workdir, '--images', str(tmp_path / 'photos'),
      '--output_dir', out, '--part_size', '4', '--dtype', 'float32',
      '--no_progress'])
  assert summary['num_exported'] == 6 and summary['parts_written'] == 2
  assert sorted(os.listdir(os.path.join(out, 'metadata'))) == [
      'metadata_0.parquet', 'metadata_1.parquet']
  output = str(tmp_path / 'query.json')
  queries = load_script('query').main([
      '--checkpoint', workdir, '--index', out, '--image', paths[4],
      '--text', 'a red circle', '--k', '3', '--output', output])
  assert [q.get('text', q.get('image')) for q in queries] == ['a red circle', paths[4]]
  assert queries[1]['results'][0]['image_path'] == paths[4]
  assert len(queries[0]['results']) == 3
  # Flags that could only mislead are refused before the checkpoint loads.
  for flags, named in [(['--k', '-2'], '--k must be at least 1'),
                       (['--k', '0'], '--k must be at least 1'),
                       (['--text', ''], '--text is empty'),
                       (['--patch_size', '0'], r'\(--patch_size\) must be at least 1')]:
    with pytest.raises(ValueError, match=named):
      load_script('query').main(['--checkpoint', workdir, '--index', out,
                                 '--text', 'a circle', *flags])
