"""The LocCa captioning decoder: its packed loss is a caption-by-caption dense
reference's, nothing leaks between images or captions of packed rows, CapPa
draws, sharding, FLOPs, config errors."""

import dataclasses
import functools
import json
import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit import sharding
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.models import attention as attention_lib
from lit_navit.models import decoder
from lit_navit.models import flops
from lit_navit.models import two_towers
import model_batches
import tiny_config

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
  c.decoder.update({**dict(weight=1.0, width=32, depth=2, mlp_dim=64, num_heads=2),
                    **decoder_overrides})
  return c


# --- batches ------------------------------------------------------------------

def image(rng, rows, cols, caption, index):
  pixels = rng.uniform(0, 255, (rows * P, cols * P, 3)).astype(np.uint8)
  tokens = np.full(T, PAD, np.int32)
  tokens[:len(caption)] = caption
  return packing.PackedImage(patches_lib.patchify(pixels, P), tokens, index)


def batches(seed=0, groups=2, rows=4, captions=7, text_rows=4):
  """The same pairs, captions one a row and packed: G groups of rows, several
  images a row, token padding, empty caption places, an all-pad caption."""
  rng = np.random.default_rng(seed)
  n = captions * groups
  lengths = rng.integers(1, T + 1, n)
  lengths[3] = 0  # An all-pad caption still pairs with its image.
  images = [image(rng, int(rng.integers(1, 4)), int(rng.integers(1, 4)),
                  rng.integers(1, VOCAB, k).tolist(), i)
            for i, k in enumerate(lengths)]
  spec = batch_lib.BatchSpec(rows=rows, tokens_per_row=24, slots=4, text_len=T,
                             patch_size=P, groups=groups, captions_per_group=captions)
  packed_spec = dataclasses.replace(spec, text_rows=text_rows)
  caption_lengths = [packing.caption_length(i.tokens, PAD) for i in images]
  plan = packing.plan([len(i.patches) for i in images], rows, 24, 4, groups=groups,
                      captions=captions, caption_lengths=caption_lengths,
                      text_rows=text_rows, text_len=T)
  one_a_row = packing.pack_batch([[images[p] for p in row] for row in plan.rows],
                                 spec, PAD)
  packed = packing.pack_batch(
      [[dataclasses.replace(images[p], text_row=plan.text_row[p]) for p in row]
       for row in plan.rows], packed_spec, PAD)
  for b, s in ((one_a_row, spec), (packed, packed_spec)):
    batch_lib.validate_batch(b, s, PAD)
  return {'one_a_row': one_a_row, 'packed': packed}


def test_the_test_batch_has_what_packing_makes_hard():
  one_a_row, packed = batches().values()
  assert np.any(one_a_row['image/segment'] == 0)  # token padding
  assert one_a_row['valid'].sum(axis=1).min() >= 2  # images sharing rows
  assert np.any(np.diff(packed['text/row'][packed['text/valid']]) == 0)  # and text rows
  assert not one_a_row['text/valid'].all()  # empty caption places
  lengths = [len(tokens) for *_, tokens in captions_of(one_a_row)]
  assert 1 in lengths and T in lengths
  assert one_a_row['text/valid'].sum() >= 10


def inputs(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k != 'index'}


@functools.lru_cache(maxsize=None)
def model_and_params(**decoder_overrides):
  c = config(**decoder_overrides)
  model = two_towers.TwoTowers(c)
  params = jax.jit(model.init)(jax.random.key(1),
                               inputs(batches()['one_a_row']))['params']
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


def assert_trees_close(a, b, **tolerance):
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                               jax.tree_util.tree_leaves_with_path(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerance)


@pytest.mark.parametrize('layout', ['one_a_row', 'packed'])
def test_packed_loss_and_gradient_equal_the_dense_reference(layout):
  model, params = model_and_params()
  batch = inputs(batches()[layout])
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: packed_loss(model, p, batch)))(params)
  ref, ref_grads = reference_loss(model, params, batch)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert_trees_close({k: grads[k] for k in ref_grads}, ref_grads, atol=2e-6, rtol=1e-4)
  assert np.abs(grads['img']['embedding']['kernel']).max() > 1e-4


# --- isolation ----------------------------------------------------------------

def per_token(model, params, batch, key=None):
  """The decoder's (cross-entropy, targets) per text token of a batch."""
  def ce(module, batch):
    _, image_tokens = module._slot_embeddings(batch, return_tokens=True)
    return module.caption_cross_entropy(image_tokens, batch, key)
  return model.apply({'params': params}, batch, method=ce)


@functools.lru_cache(maxsize=None)
def jitted_per_token():
  model, params = model_and_params()
  return jax.jit(lambda batch: per_token(model, params, batch))


def caption_ce(batch, g, c):
  """Caption place c of group g's per-token CE in a packed batch, in order."""
  ce, _ = jitted_per_token()(inputs(batch))
  row = batch['text/row'][g, c]
  mine = batch['text/segment'][g, row] == batch['text/row_segment'][g, c]
  return np.asarray(ce[g, row])[mine]


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(which=st.integers(0, 2 ** 16), seed=st.integers(0, 2 ** 16))
def test_a_caption_sees_only_its_own_image_and_caption(which, seed):
  batch = batches()['packed']
  spec = batch_lib.spec_of(batch)
  # The captions with a target (not the all-pad one).
  places = [(g, c) for g, c, _, _, tokens in captions_of(batch) if np.any(tokens != PAD)]
  g, c = places[which % len(places)]
  r, k = divmod(int(batch['text/slot'][g, c]), spec.slots)
  row = g * spec.rows_per_group + r
  before = caption_ce(batch, g, c)
  rng = np.random.default_rng(seed)

  # Every other image's pixels (of its row and every other row) and every
  # other caption's tokens (of its text row and the others) change.
  others = {key: np.array(v) for key, v in batch.items()}
  own = batch['image/segment'][row] == k + 1
  real = others['image/segment'] != 0
  real[row] &= ~own
  others['image/patches'][real] = rng.uniform(-1, 1, (real.sum(), P * P * 3))
  text_row = batch['text/row'][g, c]
  other_text = others['text/segment'] != 0
  other_text[g, text_row] &= batch['text/segment'][g, text_row] != batch['text/row_segment'][g, c]
  others['text/tokens'][other_text] = rng.integers(1, VOCAB, other_text.sum())
  np.testing.assert_allclose(caption_ce(others, g, c), before, atol=1e-5, rtol=1e-5)

  # Its own image's pixels change its loss.
  mine = {key: np.array(v) for key, v in batch.items()}
  mine['image/patches'][row, own] = rng.uniform(-1, 1, (own.sum(), P * P * 3))
  assert np.abs(caption_ce(mine, g, c) - before).max() > 1e-4


def test_no_attention_row_is_empty_in_full_rows():
  # Both rows of the group are full (no image padding), and two caption
  # rows are empty: their tokens too must find a key (attention.py).
  rng = np.random.default_rng(0)
  batch = inputs(model_batches.pack(
      [[model_batches.random_image(rng, 2, 3, P), model_batches.random_image(rng, 2, 2, P)],
       [model_batches.random_image(rng, 2, 5, P)]], tokens_per_row=10, slots=2,
      captions=[[[3, 4, 5], [6]], [[7, 8]]], text_len=T, captions_per_group=5))
  assert np.all(batch['image/segment'] != 0) and not batch['text/valid'].all()
  masks = []

  def spy(q, k, v, mask):
    jax.debug.callback(lambda m: masks.append(np.asarray(m)),
                       attention_lib.as_mask(mask))
    return attention_lib.dense_attention(q, k, v, mask)

  c = config(depth=1)
  params = model_and_params()[1]
  params = dict(params, dec={k: v for k, v in params['dec'].items() if k != 'block_1'})
  model = two_towers.TwoTowers(c)
  spied = dataclasses.replace(two_towers.caption_decoder(c), attention=spy)

  @jax.jit
  def run(params, batch):
    _, image_tokens = model.apply({'params': params}, batch, True,
                                  method=model._slot_embeddings)
    return spied.apply({'params': params['dec']}, image_tokens, batch['image/segment'],
                       2, decoder.caption_layout(batch, PAD), batch['text/slot'],
                       batch['text/valid'])
  jax.block_until_ready(run(params, batch))
  assert len(masks) == 2  # Self- and cross-attention.
  for mask in masks:
    assert mask.any(axis=-1).all()


# --- CapPa --------------------------------------------------------------------

def test_parallel_captions_equal_the_reference_with_mask_inputs():
  _, params = model_and_params()
  model = two_towers.TwoTowers(config(parallel_fraction=1.0))
  batch = inputs(batches()['packed'])
  loss = jax.jit(lambda key: packed_loss(model, params, batch, key))
  parallel = np.ones(batch['text/valid'].shape, bool)
  np.testing.assert_allclose(loss(jax.random.key(7)),
                             reference_loss(model, params, batch, parallel)[0],
                             rtol=1e-5)
  # Without a key (evaluation) no caption is parallel.
  np.testing.assert_allclose(loss(None), reference_loss(model, params, batch)[0],
                             rtol=1e-5)


def test_parallel_draws_are_keyed_by_step():
  _, params = model_and_params()
  model = two_towers.TwoTowers(config(parallel_fraction=0.5))
  batch = inputs(batches()['packed'])
  loss = jax.jit(lambda key: packed_loss(model, params, batch, key))
  step_key = lambda step: jax.random.fold_in(jax.random.key(0), step)
  draws = {step: np.asarray(jax.random.bernoulli(step_key(step), 0.5,
                                                 batch['text/valid'].shape))
           for step in (3, 4)}
  valid = np.asarray(batch['text/valid'])
  assert 0 < draws[3][valid].sum() < valid.sum()
  assert not np.array_equal(draws[3][valid], draws[4][valid])
  for step, parallel in draws.items():
    np.testing.assert_allclose(loss(step_key(step)),
                               reference_loss(model, params, batch, parallel)[0],
                               rtol=1e-5)
  assert loss(step_key(3)) == loss(step_key(3))
  assert loss(step_key(3)) != loss(step_key(4))


# --- sharding, FLOPs, config --------------------------------------------------

@pytest.mark.slow
def test_the_loss_sharded_over_data_and_fsdp_is_the_single_device_loss():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'mesh': [('data', 2), ('fsdp', 4)]}))
  model, params = model_and_params()
  host = batches(groups=8, rows=8, captions=4, text_rows=2)['packed']
  assert host['text/valid'].sum() >= 16

  def loss_and_grads(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(lambda p: packed_loss(model, p, batch))(params)

  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: packed_loss(model, p, inputs(host))))(params)
  sharded_params = jax.device_put(params, sharding.param_shardings(
      params, [('.*', 'fsdp')], mesh))
  batch = sharding.make_global_batch(
      {k: v for k, v in host.items() if k != 'index'}, mesh)
  sharded_loss, sharded_grads = jax.jit(loss_and_grads)(sharded_params, batch)
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
  assert_trees_close(sharded_grads, grads, atol=1e-6, rtol=1e-4)


def xla_flops(c, spec, batch=None):
  """XLA's FLOPs of TwoTowers(c)'s forward on a batch of `spec` (the dummy
  batch by default), layers unrolled: XLA counts a scan body once."""
  c.image.scan = c.text.scan = False
  compiled = jax.jit(two_towers.TwoTowers(c).apply).lower(
      two_towers.param_shapes(c, spec),
      two_towers.dummy_batch(spec) if batch is None else batch).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('text_rows', [None, 3])
def test_flops_match_xla_cost_analysis(text_rows):
  # The decoder's share is the difference of the model with and without it.
  spec = batch_lib.BatchSpec(rows=4, tokens_per_row=16, slots=3, text_len=T,
                             patch_size=P, groups=2, captions_per_group=5,
                             text_rows=text_rows)
  on = config(width=64, mlp_dim=256, num_heads=2)
  counted = flops.decoder_forward_flops(on, spec)
  measured = xla_flops(on, spec) - xla_flops(config(weight=0.0), spec)
  # The analytic count leaves out element-wise work: a little under XLA's.
  assert 0.95 * measured < counted <= measured
  assert flops.forward_flops(on, spec) == (flops.image_forward_flops(on, spec)
                                           + flops.text_forward_flops(on, spec)
                                           + counted)
  assert flops.training_flops(on, spec, frozen=['img']) == (
      flops.image_forward_flops(on, spec) + 3 * flops.text_forward_flops(on, spec)
      + 3 * counted)
  assert flops.decoder_forward_flops(config(weight=0.0), spec) == 0


def test_no_decoder_params_when_off():
  off = two_towers.param_shapes(config(weight=0.0))['params']
  assert 'dec' not in off
  assert off.keys() == two_towers.param_shapes(two_towers.default_config())['params'].keys()
  assert 'dec' in two_towers.param_shapes(config())['params']


@pytest.mark.parametrize('key,value,match', [
    ('weight', -1.0, 'model.decoder.weight'),
    ('parallel_fraction', 1.5, 'model.decoder.parallel_fraction'),
    ('depth', 0, 'model.decoder.depth'),
    ('num_heads', 5, 'model.decoder.width=32 is not divisible'),
    ('attention', 'flash', 'model.decoder.attention')])
def test_config_errors_name_the_key(key, value, match):
  full = config_lib.default_config()
  full.model = config(**{key: value})
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(full)
  with pytest.raises(ValueError, match=match):
    two_towers.param_shapes(full.model)


def test_caption_perplexity_needs_a_decoder_and_heldout_batches():
  full = config_lib.default_config()
  full.evals.caption_perplexity = True
  full.evals.heldout.kind = 'synthetic'
  with pytest.raises(ValueError, match='evals.caption_perplexity'):
    trainer_lib.check_evals(full)
  full.model.decoder.weight = 0.5
  trainer_lib.check_evals(full)
  full.evals.heldout.kind = ''
  with pytest.raises(ValueError, match='evals.caption_perplexity'):
    trainer_lib.check_evals(full)


# --- training -----------------------------------------------------------------

class Stop(Exception):
  pass


def train_config():
  c = tiny_config.get_config('steps=4,every=2')
  c.input.text_packing = True
  c.model.decoder.update(dict(weight=0.5, width=32, depth=1, mlp_dim=64,
                              num_heads=2, parallel_fraction=0.5))
  c.evals.heldout.kind = 'synthetic'
  c.evals.heldout.size = 32
  c.evals.heldout_batches = 2
  c.evals.caption_perplexity = True
  config_lib.check_config(c)
  return c


def metrics_of(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def params_of(workdir):
  return jax.tree.map(np.asarray, checkpoint.load_for_inference(workdir)[1])


@pytest.mark.slow
def test_training_logs_the_caption_loss_and_resumes_bitwise(tmp_path):
  reference = str(tmp_path / 'reference')
  trainer_lib.Trainer(train_config(), reference).run()
  records = metrics_of(reference)
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == [1, 2, 3, 4]
  assert all(np.isfinite(r['caption_loss']) and r['caption_loss'] > 0 for r in steps)
  # Untrained, the loss is about log(vocabulary); it goes down from there.
  assert steps[0]['caption_loss'] == pytest.approx(np.log(512), rel=0.3)
  assert steps[-1]['caption_loss'] < steps[0]['caption_loss']
  # The caption loss trains the decoder: its BOS vector (no weight decay)
  # moves from its initial value.
  fresh = trainer_lib.Trainer(train_config(), str(tmp_path / 'init'))
  initial = fresh._init_fn()['params']
  trained_bos = params_of(reference)['dec']['bos']
  assert np.abs(trained_bos - np.asarray(initial['dec']['bos'])).max() > 1e-4
  # The CapPa captions are drawn afresh each step, the same on a rerun.
  try:
    batch = sharding.make_global_batch(
        trainer_lib.model_inputs(next(fresh.pipeline)), fresh.mesh)
  finally:
    fresh.pipeline.close()
  caption_loss = jax.jit(lambda step: fresh._loss(initial, batch, step)[1]['caption_loss'])
  assert caption_loss(3) == caption_loss(3) != caption_loss(4)
  evals = [r for r in records if 'eval/caption_perplexity' in r]
  assert len(evals) == 1 and 1 < evals[0]['eval/caption_perplexity'] < 2 * 512

  # Stopped after the checkpoint of step 2, then resumed to step 4.
  resumed = str(tmp_path / 'resumed')

  def stop_at_2(step, _):
    if step == 2:
      raise Stop
  with pytest.raises(Stop):
    trainer_lib.Trainer(train_config(), resumed).run(hooks=[stop_at_2])
  # A resume, not a fresh start (which a deterministic run could not tell).
  assert trainer_lib.Trainer(train_config(), resumed).run().steps == 2
  assert [r['caption_loss'] for r in metrics_of(resumed) if 'loss' in r] == [
      r['caption_loss'] for r in steps]
  for a, b in zip(jax.tree.leaves(params_of(reference)),
                  jax.tree.leaves(params_of(resumed))):
    np.testing.assert_array_equal(a, b)
