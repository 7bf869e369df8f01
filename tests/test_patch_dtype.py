"""uint8 patches: a quarter of the bytes to the device, the same model numbers."""

import jax
import numpy as np
import pytest

from lit_navit.data import batch as batch_lib
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import synthetic
from lit_navit.data import text
from lit_navit.models import navit


def _pipeline_batch(patch_dtype):
  config = pipeline_lib.default_config()
  config.update(tokens_per_row=64, images_per_row=6, text_len=8, patch_sizes=(8,),
                pack_buffer=24, shuffle_buffer=16, workers=0, patch_dtype=patch_dtype)
  config.resolution.update(min=16, max=64)
  source = synthetic.SyntheticSource(40, seed=0, min_side=16, max_side=80)
  tokenizer = text.Tokenizer(text.default_tokenizer_path(), 8)
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=4, seed=0) as pipe:
    return next(pipe)


def test_uint8_batches_hold_the_same_pixels_and_give_the_same_embeddings():
  as_float, as_uint8 = _pipeline_batch('float32'), _pipeline_batch('uint8')
  batch_lib.validate_batch(as_uint8)
  assert as_uint8['image/patches'].dtype == np.uint8
  assert as_uint8['image/patches'].nbytes * 4 == as_float['image/patches'].nbytes
  for key in as_float:
    if key != 'image/patches':
      np.testing.assert_array_equal(as_float[key], as_uint8[key])
  real = as_float['image/segment'] != 0
  np.testing.assert_array_equal(
      as_uint8['image/patches'][real] / np.float32(127.5) - 1,
      as_float['image/patches'][real])

  model = navit.NaViT(width=32, depth=1, mlp_dim=64, num_heads=2, base_patch_size=8,
                      max_grid=16)
  inputs = lambda b: (b['image/patches'], b['image/yx'], b['image/segment'],
                      b['image/grid'])
  params = model.init(jax.random.key(0), *inputs(as_float))
  np.testing.assert_allclose(model.apply(params, *inputs(as_uint8)),
                             model.apply(params, *inputs(as_float)), atol=1e-6)


def test_packing_refuses_patches_of_another_dtype():
  image = np.zeros((16, 16, 3), np.uint8)
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=8, slots=2, text_len=2,
                             patch_size=8, patch_dtype='uint8')
  packed = packing.PackedImage(index=0, patches=patches_lib.patchify(image, 8),
                               tokens=np.ones(2, np.int32))
  with pytest.raises(ValueError, match='float32.*uint8'):
    packing.pack_batch([[packed]], spec, 0)


def test_unknown_patch_dtype_is_refused_naming_the_key():
  config = pipeline_lib.default_config()
  config.patch_dtype = 'float16'
  with pytest.raises(ValueError, match='input.patch_dtype'):
    pipeline_lib.Pipeline(synthetic.SyntheticSource(4), None, config, rows=1, seed=0)
