"""Zero-shot math on constructed embeddings, and the synthetic eval plumbing."""

import os

import numpy as np
import pytest

from lit_navit.data import synthetic
from lit_navit.evaluate import demo_eval
from lit_navit.evaluate import embed
from lit_navit.evaluate import zero_shot
import tiny_config
from eval_helpers import init_params


def test_class_embeddings_normalise_each_template_then_the_mean():
  vectors = {
      'a cat': [3.0, 0.0], 'the cat': [0.0, 1.0],  # unequal norms
      'a dog': [1.0, 1.0], 'the dog': [2.0, 2.0],
  }
  seen = []

  def embed_texts(prompts):
    seen.extend(prompts)
    return np.asarray([vectors[p] for p in prompts])

  emb = zero_shot.class_embeddings(embed_texts, ['cat', 'dog'], ['a {}', 'the {}'])
  assert seen == ['a cat', 'the cat', 'a dog', 'the dog']
  # Normalised first, so the longer 'a cat' vector does not dominate.
  np.testing.assert_allclose(emb[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(emb[1], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)


def test_classify_top1_top5_and_per_class():
  num_classes = 6
  class_emb = np.eye(num_classes, dtype=np.float32)
  # Image i scores class c with weight w[i, c]; the true class sits at a
  # chosen rank.
  ranks_wanted = [0, 0, 1, 4, 5, 2]
  labels = [0, 1, 1, 2, 3, 3]
  image_emb = np.zeros((6, num_classes), np.float32)
  for i, (label, rank) in enumerate(zip(labels, ranks_wanted)):
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank] + [label] + others[rank:]
    image_emb[i, order] = np.linspace(1.0, 0.5, num_classes)
  metrics = zero_shot.classify(image_emb, class_emb, labels)
  assert metrics['top1'] == pytest.approx(2 / 6)
  assert metrics['top5'] == pytest.approx(5 / 6)
  np.testing.assert_allclose(metrics['per_class'][:4], [1.0, 0.5, 0.0, 0.0])
  assert np.isnan(metrics['per_class'][4]) and np.isnan(metrics['per_class'][5])
  assert metrics['mean_per_class'] == pytest.approx(0.375)
  np.testing.assert_array_equal(metrics['count_per_class'], [1, 2, 1, 2, 0, 0])
  assert metrics['num_images'] == 6


def test_classify_ties_go_to_the_lower_class():
  class_emb = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  image_emb = np.asarray([[1.0, 0.0], [1.0, 0.0]], np.float32)
  metrics = zero_shot.classify(image_emb, class_emb, [0, 1], ks=(1, 2))
  # Classes 0 and 1 tie: image 0 (class 0) is right, image 1 is not at top-1.
  assert metrics['top1'] == 0.5 and metrics['top2'] == 1.0
  np.testing.assert_array_equal(metrics['predictions'], [0, 0])


def test_classify_rejects_bad_labels():
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    zero_shot.classify(np.eye(2), np.eye(2), [0, 2])
  with pytest.raises(ValueError, match='2 image embeddings but 1 labels'):
    zero_shot.classify(np.eye(2), np.eye(2), [0])


class _OracleEmbedder:
  """Embeds a synthetic image as its class, a prompt as the class it names."""

  def __init__(self, source, failed=()):
    self._source, self._failed = source, list(failed)

  def images(self, source, progress=False):
    del progress
    emb = np.zeros((len(source), 64), np.float32)
    for i in range(len(source)):
      emb[i, source.attributes(i)['class_id']] = 1.0
    for index, _, _ in self._failed:
      emb[index] = 0.0
    return emb, self._failed

  def texts(self, texts):
    names = synthetic.class_names()
    emb = np.zeros((len(texts), 64), np.float32)
    for row, text in enumerate(texts):
      for class_id, name in enumerate(names):
        if name in text:
          emb[row, class_id] = 1.0
    return emb


def test_synthetic_zero_shot_scores_all_classes_on_heldout_images():
  source = synthetic.SyntheticSource(40, seed=3, split='heldout')
  result = zero_shot.synthetic_zero_shot(_OracleEmbedder(source), source)
  assert result['top1'] == 1.0
  assert result['num_classes'] == 64
  assert result['chance'] == pytest.approx(1 / 64)
  held_out = {synthetic.class_names()[i] for i in synthetic.held_out_class_ids()}
  assert set(result['per_class']) <= held_out
  assert all(acc == 1.0 for acc in result['per_class'].values())


def test_failed_images_are_left_out_and_reported():
  source = synthetic.SyntheticSource(10, seed=0, split='heldout')
  failed = [(3, 'key-3', 'corrupt: test')]
  embedder = _OracleEmbedder(source, failed)
  labels = [source.attributes(i)['class_id'] for i in range(10)]
  metrics = zero_shot.evaluate_classification(
      embedder, source, labels, synthetic.class_names(), ['a {}'])
  assert metrics['num_images'] == 9 and metrics['top1'] == 1.0
  assert metrics['num_failed'] == 1 and metrics['failed'] == failed


def test_synthetic_eval_reports_both_metrics():
  source = synthetic.SyntheticSource(12, seed=1, split='heldout')
  result = zero_shot.synthetic_eval(_OracleEmbedder(source), source)
  assert result['zero_shot/top1'] == 1.0
  assert result['num_images'] == 12
  # The oracle embeds an image and its caption as their class, so every pair
  # of one class ties; ties go to the lower index, so only the first image
  # (caption) of each class finds its own caption (image) first.
  classes = {source.attributes(i)['class_id'] for i in range(12)}
  assert 1 < len(classes) < 12
  assert result['retrieval/image_to_text/R@1'] == len(classes) / 12
  assert result['retrieval/text_to_image/R@1'] == len(classes) / 12


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_demo_metrics_run_the_synthetic_eval_on_a_checkpoint_config(tmp_path):
  config = tiny_config.get_config()
  params = init_params(config.model, config.input.text_len)
  report = demo_eval.evaluate_and_export(config, params, str(tmp_path),
                                         num_examples=12)
  assert report['zero_shot_chance'] == pytest.approx(1 / 64)
  assert len(report['query']['top_keys']) == 5
  assert os.path.isdir(os.path.join(str(tmp_path), 'export', 'img_emb'))

  # The same numbers from scratch, from the model's embeddings of the
  # held-out images, their captions and the class prompts.
  embedder = embed.Embedder.from_config(config, params, 8)
  source = zero_shot.synthetic_heldout_source(config.input.source, 12)
  image_emb, failed = embedder.images(source, progress=False)
  assert not failed
  attributes = [source.attributes(i) for i in range(12)]
  names, templates = synthetic.class_names(), zero_shot.SYNTHETIC_TEMPLATES
  prompts = _unit(embedder.texts([t.format(n) for n in names for t in templates]))
  class_emb = _unit(prompts.reshape(len(names), len(templates), -1).mean(axis=1))
  predicted = np.argmax(image_emb @ class_emb.T, axis=1)
  labels = [a['class_id'] for a in attributes]
  assert report['zero_shot_top1'] == pytest.approx(np.mean(predicted == labels))
  scores = image_emb @ embedder.texts([a['caption'] for a in attributes]).T
  assert report['image_to_text_r1'] == pytest.approx(
      np.mean(np.argmax(scores, axis=1) == np.arange(12)))
  assert report['text_to_image_r1'] == pytest.approx(
      np.mean(np.argmax(scores, axis=0) == np.arange(12)))
