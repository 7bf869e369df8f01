"""Recall@K definitions on embeddings built to have known ranks."""

import numpy as np
import pytest

from lit_navit.evaluate import retrieval


def _unit(angles):
  """2-d unit vectors at the given angles: similarity falls with distance."""
  angles = np.asarray(angles, np.float32)
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_text_to_image_rank_is_position_of_own_image():
  images = _unit([0.0, 1.0, 2.0])
  # Caption 0 sits closest to image 1, then image 0: its image ranks 2nd.
  # Caption 1 sits on image 1; caption 2 sits nearest image 0, then 1, then 2.
  texts = _unit([0.6, 1.0, -0.5])
  ranks = retrieval.text_to_image_ranks(images, texts, [0, 1, 2])
  np.testing.assert_array_equal(ranks, [1, 0, 2])


def test_image_to_text_uses_best_of_several_captions():
  images = _unit([0.0, 3.0])
  texts = _unit([1.5, 0.1, 0.3, 2.9])
  # Image 0 owns captions 0 and 2. Nearest to it: 1, 2, 0, 3, so its captions
  # rank 2 (caption 0) and 1 (caption 2): the best counts. Image 1 owns 1 and
  # 3; nearest to it: 3, 0, 2, 1.
  ranks = retrieval.image_to_text_ranks(images, texts, [0, 1, 0, 1])
  np.testing.assert_array_equal(ranks, [1, 0])
  # Give caption 2 to image 1: image 0 is left with caption 0, at rank 2.
  ranks = retrieval.image_to_text_ranks(images, texts, [0, 1, 1, 1])
  np.testing.assert_array_equal(ranks, [2, 0])


def test_recall_at_k_both_ways():
  images = _unit([0.0, 1.0, 2.0])
  texts = _unit([0.6, 1.0, -0.5, 2.0])
  text_to_image = [0, 1, 2, 2]
  metrics = retrieval.recall_at_k(images, texts, text_to_image, ks=(1, 2, 3))
  # Text ranks: [1, 0, 2, 0].
  assert metrics['text_to_image/R@1'] == pytest.approx(2 / 4)
  assert metrics['text_to_image/R@2'] == pytest.approx(3 / 4)
  assert metrics['text_to_image/R@3'] == pytest.approx(1.0)
  # Image 0 (angle 0): captions by similarity 2 (-0.5), 0 (0.6), 1, 3 ->
  # own caption 0 is 2nd. Image 1: caption 1 first. Image 2: caption 3 first.
  assert metrics['image_to_text/R@1'] == pytest.approx(2 / 3)
  assert metrics['image_to_text/R@2'] == pytest.approx(1.0)


def test_ties_are_broken_by_index_lower_first():
  # All images identical: every caption ties with every image.
  images = np.ones((4, 2), np.float32) / np.sqrt(2)
  texts = np.ones((4, 2), np.float32) / np.sqrt(2)
  ranks = retrieval.text_to_image_ranks(images, texts, [0, 1, 2, 3])
  np.testing.assert_array_equal(ranks, [0, 1, 2, 3])
  ranks = retrieval.image_to_text_ranks(images, texts, [3, 2, 1, 0])
  np.testing.assert_array_equal(ranks, [3, 2, 1, 0])
  metrics = retrieval.recall_at_k(images, texts, [0, 1, 2, 3], ks=(1, 2))
  assert metrics['text_to_image/R@1'] == 0.25
  assert metrics['image_to_text/R@2'] == 0.5
  # The same answer however often it is asked.
  again = retrieval.recall_at_k(images, texts, [0, 1, 2, 3], ks=(1, 2))
  assert again == metrics


def test_chunking_does_not_change_ranks():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(37, 8)).astype(np.float32)
  texts = rng.normal(size=(90, 8)).astype(np.float32)
  text_to_image = np.concatenate([np.arange(37), rng.integers(0, 37, 53)])
  np.testing.assert_array_equal(
      retrieval.text_to_image_ranks(images, texts, text_to_image, chunk=7),
      retrieval.text_to_image_ranks(images, texts, text_to_image))
  np.testing.assert_array_equal(
      retrieval.image_to_text_ranks(images, texts, text_to_image, chunk=5),
      retrieval.image_to_text_ranks(images, texts, text_to_image))


def test_perfect_embeddings_give_recall_one():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(20, 16)).astype(np.float32)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  text_to_image = np.repeat(np.arange(20), 5)
  texts = images[text_to_image]
  metrics = retrieval.recall_at_k(images, texts, text_to_image)
  assert all(v == 1.0 for v in metrics.values())


def test_bad_inputs_are_named():
  images = _unit([0.0, 1.0])
  with pytest.raises(ValueError, match='no caption'):
    retrieval.recall_at_k(images, _unit([0.0]), [0])
  with pytest.raises(ValueError, match='index the 2 images'):
    retrieval.recall_at_k(images, _unit([0.0, 1.0]), [0, 2])
  with pytest.raises(ValueError, match='shape'):
    retrieval.recall_at_k(images, _unit([0.0, 1.0]), [0])


def test_an_image_whose_own_captions_all_score_below_zero():
  # Image 0's own captions (1, 2) both score below 0 with it, while caption 0,
  # image 1's, scores above 0: a rank taken from argmax(scores * own) would
  # pick caption 0 (its product, 0, beats the negative own scores) and call
  # image 0 a hit.
  images = _unit([0.0, 0.2])
  texts = _unit([0.2, 2.0, 2.5])
  text_to_image = [1, 0, 0]
  np.testing.assert_array_equal(
      retrieval.image_to_text_ranks(images, texts, text_to_image), [1, 0])
  metrics = retrieval.recall_at_k(images, texts, text_to_image, ks=(1, 2))
  assert metrics['image_to_text/R@1'] == 0.5
  assert metrics['image_to_text/R@2'] == 1.0
