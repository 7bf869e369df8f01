"""Embeds images and texts with a trained two-tower model.

Images go through the training pipeline in eval mode: every image once, in
order, at its native aspect ratio, within a token budget; nothing sampled,
nothing dropped. Two ways to size an image (`resize`, see `resolution`):

  'fit'     scaled up or down to fill the budget (SigLIP 2 NaFlex): every
            image costs ~the budget, so rows hold one image each.
  'native'  its own size in whole patches, scaled down only when that
            exceeds the budget: small images cost few tokens, so several
            share a packed row.
  'square'  stretched to the largest square in the budget, aspect not kept:
            how a plain ViT trained on square inputs sees images.

Outputs are scattered back to source order by each slot's `index`, so
packing never shows. On a multi-process run each process embeds its own
block of the images (`sources.host_shard`) and every process gets them all.
"""

import math

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from lit_navit.data import decode
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import resolution
from lit_navit.data import sources
from lit_navit.data import text as text_lib
from lit_navit.models import two_towers

# Model inputs of a packed batch; `index` stays on the host.
_IMAGE_KEYS = ('image/patches', 'image/yx', 'image/grid', 'image/segment')
RESIZE_MODES = resolution.EVAL_MODES
NATIVE_IMAGES_PER_ROW = 16  # E of 'native' rows by default (`default_rows`).


def default_budget(input_config, patch_size):
  """Tokens of the largest training image: a square at `resolution.max`
  pixels for 'side' / 'area' sizing, capped at a row; else the config's
  `resolution.max_tokens`, else a row. Evaluating far above the training
  resolution shifts the position embeddings out of what training saw."""
  res = input_config.resolution
  if res.max_tokens:
    return int(res.max_tokens)
  if res.mode in ('side', 'area'):
    side = math.ceil(res.max / patch_size)
    return int(min(side * side, input_config.tokens_per_row))
  return int(input_config.tokens_per_row)


def eval_input_config(input_config, *, resize='fit', max_tokens=None,
                      patch_size=None, tokens_per_row=None,
                      images_per_row=None):
  """The `input` config turned to eval mode, with optional overrides.

  Args:
    input_config: a pipeline config (e.g. the training config's `input`).
    resize: 'fit', 'native' or 'square' (see the module doc).
    max_tokens: token budget of one image; default: `default_budget`.
    patch_size: default: the first of the config's `patch_sizes`.
    tokens_per_row: L; default: `default_rows`.
    images_per_row: E; default: `default_rows`.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f'resize must be one of {RESIZE_MODES}, got {resize!r}')
  config = input_config.copy_and_resolve_references()
  config.mode = 'eval'
  if patch_size is not None and not patch_size >= 1:
    raise ValueError(f'patch size (--patch_size) must be at least 1, got {patch_size}')
  config.patch_sizes = (int(patch_size or tuple(config.patch_sizes)[0]),)
  budget = int(max_tokens or default_budget(config, config.patch_sizes[0]))
  config.resolution.mode = resize
  config.resolution.max_tokens = budget
  default_tokens, default_images = default_rows(resize, budget)
  config.tokens_per_row = int(tokens_per_row or default_tokens)
  config.images_per_row = int(images_per_row or default_images)
  with config.unlocked():
    config.captions_per_row = None  # Images only: captions never limit packing.
  return config


def default_rows(resize, budget):
  """(L, E) that embed fastest in `resize` mode (benchmarks/bench_export.py).

  Rows are one budget long in both modes: attention costs grow with L, and
  longer rows save little padding. 'fit' fills every image's budget, so a
  row holds one image (NaFlex-style) and wastes only aspect rounding;
  'square' holds one image too.
  'native' images are mostly below the budget, and best-fit over the
  pending buffer packs them into rows of one budget to 2-4% padding (0.7-
  2.4% in rows of four budgets, at far more attention).
  """
  if resize == 'native':
    return budget, NATIVE_IMAGES_PER_ROW
  return budget, 1


class Embedder:
  """L2-normalised image and text embeddings from one model and its params.

  Args:
    model: a `two_towers.TwoTowers`.
    params: its parameters (the tree under 'params').
    input_config: the pipeline config; it is used in eval mode (see
      `eval_input_config`, which resize, max_tokens, patch_size,
      tokens_per_row and images_per_row are passed to).
    tokenizer: has `encode(list[str]) -> int32 [N, T]` and `pad_id`.
    batch_rows: packed rows per image batch.
    text_batch: captions per text batch.
  """

  def __init__(self, model, params, input_config, tokenizer, batch_rows, *,
               resize='fit', max_tokens=None, patch_size=None,
               tokens_per_row=None, images_per_row=None, text_batch=256):
    self.model = model
    self.params = params
    self.input_config = eval_input_config(
        input_config, resize=resize, max_tokens=max_tokens,
        patch_size=patch_size, tokens_per_row=tokens_per_row,
        images_per_row=images_per_row)
    self.tokenizer = tokenizer
    self.batch_rows = batch_rows
    self.text_batch = text_batch
    self.dim = model.config.embed_dim
    # Shapes are static per patch size, so each of these compiles once per
    # patch size (images) or once (texts).
    self._embed_images = jax.jit(lambda p, batch: model.apply(
        {'params': p}, batch, method=model.embed_images))
    self._embed_texts = jax.jit(lambda p, tokens: model.apply(
        {'params': p}, tokens, method=model.embed_texts))

  @classmethod
  def from_config(cls, config, params, batch_rows, **kwargs):
    """From a full training config (`config.model`, `config.input`), as
    `checkpoint.load_for_inference` returns it."""
    tokenizer = text_lib.Tokenizer.from_config(config.input)
    return cls(two_towers.TwoTowers(config.model), params, config.input,
               tokenizer, batch_rows, **kwargs)

  @property
  def patch_size(self):
    return self.input_config.patch_sizes[0]

  @property
  def max_tokens(self):
    return self.input_config.resolution.max_tokens

  @property
  def resize(self):
    return self.input_config.resolution.mode

  def images(self, source, progress=True):
    """Embeds every image of `source`.

    On a multi-process run every process must call this with the same
    source: each embeds its block and the blocks are gathered.

    Returns:
      (emb, failed): emb float32 [len(source), D] in source order, a zero row
      for each image that failed; failed lists (index, key, reason) for the
      images that could not be read or decoded.
    """
    block = sources.host_shard(len(source), jax.process_index(),
                               jax.process_count())
    emb, seen = self._embed_block(source, block,
                                  progress and jax.process_index() == 0)
    if jax.process_count() > 1:
      emb, seen = _gather_blocks(emb, seen, len(source))
    failed = [self._failure(source, int(i)) for i in np.flatnonzero(~seen)]
    return emb, failed

  def _embed_block(self, source, block, progress):
    """(emb [len(block), D], seen [len(block)]) of this process's images."""
    emb = np.zeros((len(block), self.dim), np.float32)
    seen = np.zeros(len(block), bool)
    bar = tqdm.tqdm(total=len(block), unit='img', disable=not progress,
                    desc=f'images ({self.resize}, p={self.patch_size}, '
                    f'<={self.max_tokens} tokens)')
    in_flight = None  # The previous batch's (indices, device result).

    def collect(indices, result):
      result = np.asarray(result)
      valid = indices >= 0
      emb[indices[valid] - block.start] = result[valid]
      seen[indices[valid] - block.start] = True
      bar.update(int(valid.sum()))

    # The pipeline reads this process's block and keeps source indices.
    with pipeline_lib.Pipeline(source, self.tokenizer, self.input_config,
                               rows=self.batch_rows, seed=0,
                               process_index=jax.process_index(),
                               process_count=jax.process_count()) as batches:
      for batch in batches:
        inputs = {k: batch[k] for k in _IMAGE_KEYS}
        result = self._embed_images(self.params, inputs)
        # Dispatch is asynchronous: the host packs the next batch while the
        # device runs this one, and only then waits for the previous result.
        if in_flight is not None:
          collect(*in_flight)
        in_flight = (batch['index'].reshape(-1), result)
    if in_flight is not None:
      collect(*in_flight)
    # Images that failed are done work too: the bar ends at 100%.
    bar.set_postfix(failed=int((~seen).sum()))
    bar.update(len(block) - bar.n)
    bar.close()
    return emb, seen

  def _failure(self, source, index):
    """(index, key, reason) of an image the pipeline skipped."""
    record = source[index]
    if record.error:
      return index, record.key, record.error
    try:
      decode.decode_image(record.image, self.input_config.max_pixels)
    except decode.BadImage as e:
      return index, record.key, str(e)
    return index, record.key, 'skipped by the pipeline'

  def texts(self, texts, progress=False):
    """Embeds captions; returns float32 [len(texts), D].

    Texts go in fixed-size chunks, the last one padded, so one compilation
    serves every call.
    """
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    chunks = range(0, len(texts), self.text_batch)
    for start in tqdm.tqdm(chunks, unit='batch', desc='texts',
                           disable=not progress):
      chunk = texts[start:start + self.text_batch]
      padded = chunk + [''] * (self.text_batch - len(chunk))
      tokens = np.asarray(self.tokenizer.encode(padded), np.int32)
      result = np.asarray(self._embed_texts(self.params, tokens))
      out[start:start + len(chunk)] = result[:len(chunk)]
    return out


def _gather_blocks(emb, seen, num_images):
  """Every process's (emb, seen) block, joined in process (= source) order.

  Blocks differ in size by at most one; each is padded to the largest for
  the gather and cut back after.
  """
  count = jax.process_count()
  sizes = [len(sources.host_shard(num_images, p, count)) for p in range(count)]
  largest = max(sizes)
  padded_emb = np.zeros((largest, emb.shape[1]), np.float32)
  padded_seen = np.zeros(largest, bool)
  padded_emb[:len(emb)], padded_seen[:len(seen)] = emb, seen
  all_emb = multihost_utils.process_allgather(padded_emb)
  all_seen = multihost_utils.process_allgather(padded_seen)
  return (np.concatenate([e[:n] for e, n in zip(all_emb, sizes)]),
          np.concatenate([s[:n] for s, n in zip(all_seen, sizes)]))
