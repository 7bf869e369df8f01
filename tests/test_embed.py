"""Embedder: eval-mode pipeline, outputs in source order, one compile."""

import numpy as np
import pytest

from lit_navit.data import pipeline
from lit_navit.data import resolution
from lit_navit.evaluate import datasets
from lit_navit.evaluate import embed
from eval_helpers import input_config, tiny_embedder, write_images

SIZES = [(30, 20), (16, 48), (40, 40), (24, 8), (64, 16), (20, 20), (8, 40),
         (33, 17), (50, 25)]


def test_images_come_back_in_source_order_independent_of_packing(tmp_path):
  paths = write_images(str(tmp_path), SIZES)
  # Rows of two budgets and four slots: images share rows.
  embedder = tiny_embedder(batch_rows=2, tokens_per_row=32, images_per_row=4)
  emb, failed = embedder.images(datasets.ImageFiles(paths), progress=False)
  assert failed == []
  assert emb.shape == (len(SIZES), 16) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  # Each image alone in its batch embeds the same as packed with others.
  for i in (0, 4, 8):
    alone, _ = embedder.images(datasets.ImageFiles([paths[i]]), progress=False)
    np.testing.assert_allclose(alone[0], emb[i], atol=2e-5)
  # Several batches of one shape: a single compilation.
  assert embedder._embed_images._cache_size() == 1


def test_native_packs_small_images_through_the_same_code_path(tmp_path):
  paths = write_images(str(tmp_path), SIZES)
  files = datasets.ImageFiles(paths)
  native = tiny_embedder(resize='native')
  fit = tiny_embedder(resize='fit')
  native_emb, failed = native.images(files, progress=False)
  fit_emb, _ = fit.images(files, progress=False)
  assert failed == []
  np.testing.assert_allclose(np.linalg.norm(native_emb, axis=1), 1.0, rtol=1e-5)
  for i, (width, height) in enumerate(SIZES):
    same_grid = (resolution.grid_for_native(height, width, 8, 16) ==
                 resolution.grid_for_budget(height, width, 16))
    # Same grid, same pixels, same embedding, whatever shares the row;
    # images below the budget are not scaled up, so they differ.
    if same_grid:
      np.testing.assert_allclose(native_emb[i], fit_emb[i], atol=2e-5)
    else:
      assert not np.allclose(native_emb[i], fit_emb[i], atol=1e-3)
  alone, _ = native.images(datasets.ImageFiles([paths[3]]), progress=False)
  np.testing.assert_allclose(alone[0], native_emb[3], atol=2e-5)
  assert native._embed_images._cache_size() == 1
  # The images did share rows.
  with pipeline.Pipeline(files, native.tokenizer, native.input_config,
                         rows=native.batch_rows, seed=0) as batches:
    assert max(int(b['valid'].sum(1).max()) for b in batches) > 1


def test_unreadable_images_are_listed_not_fatal(tmp_path):
  paths = write_images(str(tmp_path), SIZES[:3])
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8 not really a jpeg')
  files = datasets.ImageFiles([paths[0], str(broken), str(tmp_path / 'gone.png'),
                               paths[1]])
  emb, failed = tiny_embedder().images(files, progress=False)
  assert [(i, key) for i, key, _ in failed] == [(1, str(broken)),
                                                (2, str(tmp_path / 'gone.png'))]
  assert 'unreadable' in failed[1][2]
  assert np.all(emb[[1, 2]] == 0)
  np.testing.assert_allclose(np.linalg.norm(emb[[0, 3]], axis=1), 1.0, rtol=1e-5)


def test_texts_in_padded_chunks_match_one_by_one():
  embedder = tiny_embedder(text_batch=4)
  texts = [f'caption number {i}' for i in range(7)]
  together = embedder.texts(texts)
  assert together.shape == (7, 16)
  for i in (0, 5, 6):
    np.testing.assert_allclose(embedder.texts([texts[i]])[0], together[i], atol=1e-5)
  assert embedder._embed_texts._cache_size() == 1
  assert embedder.texts([]).shape == (0, 16)


def test_eval_config_defaults_and_overrides():
  embedder = tiny_embedder()
  assert embedder.max_tokens == 16 and embedder.patch_size == 8
  # 'fit' by default, in NaFlex-style rows: one image of one budget per row.
  assert embedder.resize == 'fit'
  assert embedder.input_config.tokens_per_row == 16
  assert embedder.input_config.images_per_row == 1
  assert embedder.input_config.mode == 'eval'
  # 'native' packs: rows of one budget, several images each.
  embedder = tiny_embedder(resize='native')
  assert embedder.input_config.resolution.mode == 'native'
  assert embedder.input_config.tokens_per_row == 16
  assert embedder.input_config.images_per_row == embed.NATIVE_IMAGES_PER_ROW
  embedder = tiny_embedder(max_tokens=64, patch_size=4, tokens_per_row=128,
                           images_per_row=3)
  assert embedder.max_tokens == 64 and embedder.patch_size == 4
  assert embedder.input_config.tokens_per_row == 128
  assert embedder.input_config.images_per_row == 3
  with pytest.raises(ValueError, match='resize'):
    tiny_embedder(resize='crop')


def test_default_budget_is_the_largest_training_image():
  config = input_config(max_tokens=None)
  config.tokens_per_row = 128
  config.resolution.mode = 'side'
  config.resolution.max = 60  # ceil(60 / 8) = 8 patches a side
  assert embed.default_budget(config, 8) == 64
  assert embed.default_budget(config, 4) == 128  # 15 x 15, capped at a row
  config.resolution.mode = 'fit'
  assert embed.default_budget(config, 8) == 128
  config.resolution.max_tokens = 32
  assert embed.default_budget(config, 8) == 32
  assert embed.eval_input_config(config).resolution.max_tokens == 32
