"""A tiny randomly initialised model, a byte tokenizer and image files, for
the evaluation and export tests."""

import functools
import importlib.util
import os

import jax
import numpy as np
from PIL import Image

from lit_navit import checkpoint
from lit_navit.data import batch as batch_lib
from lit_navit.data import pipeline
from lit_navit.evaluate import embed
from lit_navit.models import two_towers

TEXT_LEN = 8
PATCH_SIZE = 8


class ByteTokenizer:
  """UTF-8 bytes + 1 as token ids (0 pads); enough to tell captions apart."""
  pad_id = 0

  def __init__(self, length=TEXT_LEN):
    self.length = length

  def encode(self, texts):
    tokens = np.zeros((len(texts), self.length), np.int32)
    for row, text in enumerate(texts):
      ids = [b + 1 for b in text.encode('utf-8')[:self.length]]
      tokens[row, :len(ids)] = ids
    return tokens


def init_params(model_config, text_len=TEXT_LEN):
  """Random parameters of TwoTowers(model_config)."""
  model = two_towers.TwoTowers(model_config)
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=4, slots=1, text_len=text_len,
                             patch_size=two_towers.base_patch_size(model_config.image))
  batch = {k: v for k, v in spec.empty().items() if k != 'index'}
  return jax.jit(model.init)(jax.random.key(0), batch)['params']


@functools.lru_cache(maxsize=None)
def tiny_model():
  """(TwoTowers, params): 'mu' towers, 16-dim embeddings; built once."""
  config = two_towers.default_config()
  config.image.variant = f'mu/{PATCH_SIZE}'
  config.image.max_grid = 16
  config.text.variant = 'mu'
  config.text.vocab_size = 257
  config.text.max_len = TEXT_LEN
  config.embed_dim = 16
  return two_towers.TwoTowers(config), init_params(config)


def input_config(max_tokens=16):
  config = pipeline.default_config()
  config.tokens_per_row = 32
  config.images_per_row = 4
  config.text_len = TEXT_LEN
  config.patch_sizes = (PATCH_SIZE,)
  config.resolution.max_tokens = max_tokens
  config.pack_buffer = 8
  config.workers = 0
  return config


def tiny_embedder(batch_rows=2, **kwargs):
  model, params = tiny_model()
  return embed.Embedder(model, params, input_config(), ByteTokenizer(),
                        batch_rows, **kwargs)


def write_checkpoint(workdir):
  """One checkpoint of a randomly initialised tiny_config model in `workdir`."""
  import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  params = init_params(config.model, config.input.text_len)
  saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  saver.save(1, {'params': params}, {}, config)
  saver.close()
  return workdir


def write_images(folder, sizes, seed=0):
  """Random-noise JPEGs of the given (width, height); returns their paths."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for n, (width, height) in enumerate(sizes):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = os.path.join(folder, f'img_{n:03d}.jpg')
    Image.fromarray(pixels).save(path, quality=95)
    paths.append(path)
  return paths


EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'eval')


def load_script(name):
  """An eval/ script as a module, so a test can call its main(argv)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(EVAL_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
