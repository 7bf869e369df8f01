"""The LocCa captioning decoder: its packed loss is a caption-by-caption dense
reference's, nothing leaks between images or captions of packed rows, CapPa
draws, sharding, FLOPs, config errors."""

import dataclasses
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit import sharding
from lit_navit.data import batch as batch_lib
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.models import decoder
from lit_navit.models import flops
from lit_navit.models import two_towers

PAD = 0
T = 8
VOCAB = 16
P = 4


def config(**decoder_overrides):
  c = two_towers.default_config()
  c.image.variant = f'mu/{P}'
  c.image.max_grid = 8
  c.text.variant = 'mu'
  c.text.vocab_size = VOCAB
  c.text.max_len = T
  c.embed_dim = 16
  c.decoder.update(dict(weight=1.0, width=32, depth=2, mlp_dim=64, num_heads=2,
                        **decoder_overrides))
  return c


# --- batches ------------------------------------------------------------------

def image(rng, rows, cols, caption, index):
  pixels = rng.uniform(0, 255, (rows * P, cols * P, 3)).astype(np.uint8)
  tokens = np.full(T, PAD, np.int32)
  tokens[:len(caption)] = caption
  return packing.PackedImage(patches_lib.patchify(pixels, P), tokens, index)


def batches(seed=0, groups=2, rows=4):
  """The same pairs, captions one a row and packed: G groups of rows, several
  images a row, token padding, empty caption places, an all-pad caption."""
  rng = np.random.default_rng(seed)
  n = 7 * groups
  lengths = rng.integers(1, T + 1, n)
  lengths[3] = 0  # An all-pad caption still pairs with its image.
  images = [image(rng, int(rng.integers(1, 4)), int(rng.integers(1, 4)),
                  rng.integers(1, VOCAB, k).tolist(), i)
            for i, k in enumerate(lengths)]
  spec = batch_lib.BatchSpec(rows=rows, tokens_per_row=24, slots=4, text_len=T,
                             patch_size=P, groups=groups, captions_per_group=7)
  packed_spec = dataclasses.replace(spec, text_rows=4)
  caption_lengths = [packing.caption_length(i.tokens, PAD) for i in images]
  plan = packing.plan([len(i.patches) for i in images], rows, 24, 4, groups=groups,
                      captions=7, caption_lengths=caption_lengths, text_rows=4,
                      text_len=T)
  one_a_row = packing.pack_batch([[images[p] for p in row] for row in plan.rows],
                                 spec, PAD)
  packed = packing.pack_batch(
      [[dataclasses.replace(images[p], text_row=plan.text_row[p]) for p in row]
       for row in plan.rows], packed_spec, PAD)
  for b, s in ((one_a_row, spec), (packed, packed_spec)):
    batch_lib.validate_batch(b, s, PAD)
  assert np.any(one_a_row['image/segment'] == 0)
  assert one_a_row['valid'].sum(axis=1).max() >= 2
  assert np.any(np.diff(packed['text/row'][packed['text/valid']]) == 0)
  return {'one_a_row': inputs(one_a_row), 'packed': inputs(packed)}


def inputs(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k != 'index'}


@functools.lru_cache(maxsize=None)
def model_and_params(**decoder_overrides):
  c = config(**decoder_overrides)
  model = two_towers.TwoTowers(c)
  params = jax.jit(model.init)(jax.random.key(1), batches()['one_a_row'])['params']
  # Non-trivial BOS and [MASK] vectors, so swapping them shows.
  params = dict(params, dec=dict(params['dec'], bos=params['dec']['bos'] * 30,
                                 mask=params['dec']['mask'] * 30))
  return model, params


# --- the dense reference ----------------------------------------------------

def layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p['scale'] + p['bias']


def dense(p, x):
  return x @ p['kernel'] + p['bias']


def attention(p, q_in, kv_in, mask):
  """Multi-head attention of one sequence: q_in [n, D], kv_in [m, D], mask [n, m]."""
  q, k, v = (jnp.einsum('nd,dhe->nhe', x, p[name]['kernel']) + p[name]['bias']
             for name, x in (('query', q_in), ('key', kv_in), ('value', kv_in)))
  logits = jnp.einsum('nhe,mhe->hnm', q, k) / np.sqrt(q.shape[-1])
  weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  out = jnp.einsum('hnm,mhe->nhe', weights, v)
  return jnp.einsum('nhe,hed->nd', out, p['out']['kernel']) + p['out']['bias']


def reference_ce(p, image_tokens, m, caption, n, parallel=False):
  """Per-token cross-entropy [T] of one caption, its n tokens first in
  caption [T], on its own image's m tokens alone, first in image_tokens
  [L, W]: a plain causal mask (none for CapPa) over its n tokens, no
  packing, no segment ids."""
  image = dense(p['image_projection'], image_tokens)
  if parallel:
    x = jnp.broadcast_to(p['mask'], (T, p['bos'].shape[0]))
  else:
    previous = p['Embed']['embedding'][caption[:-1]]
    x = jnp.concatenate([p['bos'][None], previous])
  x = x + p['pos_embedding'][:T]
  inside = jnp.arange(T) < n
  self_mask = inside[None, :] & (True if parallel else np.tril(np.ones((T, T), bool)))
  self_mask |= np.eye(T, dtype=bool)  # Positions past the caption: anything finite.
  for i in range(len([k for k in p if k.startswith('block_')])):
    b = p[f'block_{i}']
    y = layer_norm(b['LayerNorm_0'], x)
    x = x + attention(b['SelfAttention'], y, y, self_mask)
    y = layer_norm(b['LayerNorm_1'], x)
    x = x + attention(b['CrossAttention'], y, image,
                      jnp.broadcast_to(jnp.arange(len(image)) < m, (T, len(image))))
    y = layer_norm(b['LayerNorm_2'], x)
    mlp = b['MlpBlock']
    x = x + dense(mlp['Dense_1'], jax.nn.gelu(dense(mlp['Dense_0'], y)))
  logits = dense(p['head'], layer_norm(p['decoder_norm'], x))
  log_p = jax.nn.log_softmax(logits)
  return -log_p[jnp.arange(T), caption]


def captions_of(batch):
  """Per valid caption: (group, place, its row in the batch, its slot k, tokens)."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  spec = batch_lib.spec_of(batch)
  out = []
  for g, c in zip(*np.nonzero(np.asarray(batch['text/valid']))):
    r, k = divmod(int(batch['text/slot'][g, c]), spec.slots)
    if 'text/segment' in batch:
      row = int(batch['text/row'][g, c])
      mine = batch['text/segment'][g, row] == batch['text/row_segment'][g, c]
      tokens = batch['text/tokens'][g, row][mine]
    else:
      tokens = batch['text/tokens'][g, c]
      tokens = tokens[:packing.caption_length(tokens, PAD)]
    out.append((g, c, g * spec.rows_per_group + r, k, tokens))
  return out


@functools.partial(jax.jit, static_argnames='parallel')
def caption_value_and_grad(dec, image_tokens, m, caption, n, parallel=False):
  """Summed CE of one caption's real targets, and its gradient with respect
  to the decoder and the image tokens (see reference_ce)."""
  def summed(dec, image_tokens):
    ce = reference_ce(dec, image_tokens, m, caption, n, parallel)
    return jnp.sum(jnp.where((caption != PAD) & (jnp.arange(T) < n), ce, 0.0))
  return jax.value_and_grad(summed, argnums=(0, 1))(dec, image_tokens)


def reference_loss(model, params, batch, parallel=None):
  """(mean token CE, its gradient {'dec', 'img'}) caption by caption. The
  image tower runs as in the model; its tokens' gradient, summed over
  captions, is pulled back through it once (one jit over every caption
  compiles for minutes)."""
  def image_tokens_of(img):
    return model.apply({'params': dict(params, img=img)}, batch, True,
                       method=model._slot_embeddings)[1]
  image_tokens = jax.jit(image_tokens_of)(params['img'])
  pull_back = jax.jit(lambda img, ct: jax.vjp(image_tokens_of, img)[1](ct))
  segment = np.asarray(batch['image/segment'])
  total, count = 0.0, 0
  dec_grad = jax.tree.map(jnp.zeros_like, params['dec'])
  token_grad = jnp.zeros_like(image_tokens)
  for g, c, row, k, tokens in captions_of(batch):
    own = np.flatnonzero(segment[row] == k + 1)
    padded = np.pad(own, (0, segment.shape[1] - len(own)))  # Static shapes.
    value, (d_dec, d_tokens) = caption_value_and_grad(
        params['dec'], image_tokens[row, padded], len(own),
        np.pad(tokens, (0, T - len(tokens))), len(tokens),
        parallel is not None and bool(parallel[g, c]))
    total, count = total + value, count + int(np.sum(tokens != PAD))
    dec_grad = jax.tree.map(jnp.add, dec_grad, d_dec)
    token_grad = token_grad.at[row, padded].add(d_tokens)  # Zero past m.
  grads = {'dec': dec_grad, 'img': pull_back(params['img'], token_grad)[0]}
  return total / count, jax.tree.map(lambda x: x / count, grads)


def packed_loss(model, params, batch, key=None):
  return model.apply({'params': params}, batch, caption_key=key)[2]['caption_loss']


@pytest.mark.parametrize('layout', ['one_a_row', 'packed'])
def test_packed_loss_and_gradient_equal_the_dense_reference(layout):
  model, params = model_and_params()
  batch = batches()[layout]
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: packed_loss(model, p, batch)))(params)
  ref, ref_grads = reference_loss(model, params, batch)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for tower in ('dec', 'img'):
    flat, ref_flat = (jax.tree_util.tree_leaves_with_path(g[tower])
                      for g in (grads, ref_grads))
    for (path, a), (_, b) in zip(flat, ref_flat):
      np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4,
                                 err_msg=f'{tower}{jax.tree_util.keystr(path)}')
  assert np.abs(grads['img']['embedding']['kernel']).max() > 1e-4
