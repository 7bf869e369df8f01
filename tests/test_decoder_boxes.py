"""LocCa's box tasks on the captioning decoder: their loss is a
sequence-by-sequence dense reference's, a task sees only its own image and
sequence, only its targets count, params and config checks, FLOPs, sharding,
and the trainer's wiring.

The box batches are built by hand following the batch contract
(box/tokens, box/target, box/valid; data/boxes.py's token format).
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lit_navit import config as config_lib
from lit_navit import metrics as metrics_lib
from lit_navit import sharding
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import boxes
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.models import flops
from lit_navit.models import two_towers
import test_decoder as td
from test_decoder import PAD, T, VOCAB, P, inputs

BINS = 10
FORMAT = boxes.BoxFormat(VOCAB, BINS)
BOXES = dict(box_weight=1.0, box_bins=BINS)


# --- box batches ----------------------------------------------------------------

def box_task(rng, kind):
  """(tokens [T], target [T]) of an ARef or GCap sequence (contract_boxes)."""
  text = rng.integers(1, VOCAB, int(rng.integers(1, 4))).tolist()
  (y0, y1), (x0, x1) = np.sort(rng.uniform(0, 1, (2, 2)), axis=1)
  bins = np.minimum(np.floor(np.array([y0, x0, y1, x1]) * BINS), BINS - 1)
  locations = (FORMAT.vocab_offset + bins.astype(int)).tolist()
  if kind == 'aref':
    body, target = [FORMAT.aref_token] + text + locations, [0] * (1 + len(text)) + [1] * 4
  else:
    body, target = [FORMAT.gcap_token] + locations + text, [0] * 5 + [1] * len(text)
  tokens = np.full(T, PAD, np.int32)
  tokens[:len(body)] = body
  return tokens, np.pad(np.array(target, bool), (0, T - len(target)))


def with_boxes(batch, seed=0):
  """`batch` with a box task at most of its valid caption places."""
  rng = np.random.default_rng(seed)
  valid = np.asarray(batch['text/valid'])
  tokens = np.full(valid.shape + (T,), PAD, np.int32)
  target = np.zeros(valid.shape + (T,), bool)
  has_box = valid & (rng.uniform(size=valid.shape) < 0.8)
  for n, (g, c) in enumerate(zip(*np.nonzero(has_box))):
    tokens[g, c], target[g, c] = box_task(rng, ('aref', 'gcap')[n % 2])
  return dict(batch, **{'box/tokens': tokens, 'box/target': target,
                        'box/valid': has_box})


@functools.lru_cache(maxsize=None)
def box_batches(**kwargs):
  return {layout: with_boxes(batch) for layout, batch in td.batches(**kwargs).items()}


def places(batch):
  """Per box task: (group, place, its image's row in the batch, slot k)."""
  spec = batch_lib.spec_of(batch)
  out = []
  for g, c in zip(*np.nonzero(np.asarray(batch['box/valid']))):
    r, k = divmod(int(batch['text/slot'][g, c]), spec.slots)
    out.append((g, c, g * spec.rows_per_group + r, k))
  return out


def test_the_box_batch_has_both_tasks_and_places_without_one():
  batch = box_batches()['packed']
  tasks = batch['box/tokens'][batch['box/valid']][:, 0]
  assert {FORMAT.aref_token, FORMAT.gcap_token} <= set(tasks.tolist())
  assert np.any(batch['text/valid'] & ~batch['box/valid'])
  assert not np.any(batch['box/valid'] & ~batch['text/valid'])
  assert len(places(batch)) >= 8


# --- the dense reference ----------------------------------------------------------

@jax.jit
def box_value_and_grad(dec, image_tokens, m, tokens, target):
  """Summed CE of one box sequence's targets on its own image's m tokens (a
  plain causal mask over the whole row), and its gradient with respect to
  the decoder and the image tokens."""
  def summed(dec, image_tokens):
    ce = td.reference_ce(dec, image_tokens, m, tokens, T)
    return jnp.sum(jnp.where(target, ce, 0.0))
  return jax.value_and_grad(summed, argnums=(0, 1))(dec, image_tokens)


def reference_box_loss(model, params, batch):
  """(mean target CE, its gradient {'dec', 'img'}) sequence by sequence."""
  def image_tokens_of(img):
    return model.apply({'params': dict(params, img=img)}, batch, True,
                       method=model._slot_embeddings)[1]
  image_tokens = jax.jit(image_tokens_of)(params['img'])
  segment = np.asarray(batch['image/segment'])
  total, count = 0.0, 0
  dec_grad = jax.tree.map(jnp.zeros_like, params['dec'])
  token_grad = jnp.zeros_like(image_tokens)
  for g, c, row, k in places(batch):
    own = np.flatnonzero(segment[row] == k + 1)
    padded = np.pad(own, (0, segment.shape[1] - len(own)))  # Static shapes.
    target = np.asarray(batch['box/target'][g, c])
    value, (d_dec, d_tokens) = box_value_and_grad(
        params['dec'], image_tokens[row, padded], len(own),
        np.asarray(batch['box/tokens'][g, c]), target)
    total, count = total + value, count + int(target.sum())
    dec_grad = jax.tree.map(jnp.add, dec_grad, d_dec)
    token_grad = token_grad.at[row, padded].add(d_tokens)
  pull_back = jax.jit(lambda img, ct: jax.vjp(image_tokens_of, img)[1](ct))
  grads = {'dec': dec_grad, 'img': pull_back(params['img'], token_grad)[0]}
  return total / count, jax.tree.map(lambda x: x / count, grads)


def extras(model, params, batch):
  return model.apply({'params': params}, batch)[2]


def test_box_loss_and_gradient_equal_the_dense_reference():
  # Packed text: C box rows after R != C text rows (the other tests use
  # one caption a row).
  layout = 'packed'
  model, params = td.model_and_params(**BOXES)
  batch = inputs(box_batches()[layout])

  def box_loss(params, batch):
    out = extras(model, params, batch)
    return out['box_loss'], out['caption_loss']
  run = jax.jit(jax.value_and_grad(box_loss, has_aux=True))
  (loss, caption_loss), grads = run(params, batch)
  ref, ref_grads = reference_box_loss(model, params, batch)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  td.assert_trees_close({k: grads[k] for k in ref_grads}, ref_grads, atol=2e-6, rtol=1e-4)
  assert np.abs(grads['img']['embedding']['kernel']).max() > 1e-4
  # The box rows in the same call leave the captions' loss as it was.
  other = inputs(with_boxes(td.batches()[layout], seed=5))
  (other_loss, other_caption_loss), _ = run(params, other)
  assert abs(other_loss - loss) > 1e-3
  np.testing.assert_allclose(other_caption_loss, caption_loss, rtol=1e-6)


# --- isolation and targets ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jitted_box_ce():
  model, params = td.model_and_params(**BOXES)

  def ce(module, batch):
    _, image_tokens = module._slot_embeddings(batch, return_tokens=True)
    return module.decoder_cross_entropy(image_tokens, batch)['box'][0]
  return jax.jit(lambda batch: model.apply({'params': params}, batch, method=ce))


def box_ce(batch):
  return np.asarray(jitted_box_ce()(inputs(batch)))


def test_a_box_task_sees_only_its_own_image_and_sequence():
  batch = box_batches()['packed']
  before = box_ce(batch)
  rng = np.random.default_rng(0)
  for g, c, row, k in places(batch)[::3]:
    # Every other image's pixels, every other place's box sequence (task,
    # prompt and targets) and every caption change.
    others = {key: np.array(v) for key, v in batch.items()}
    own = batch['image/segment'][row] == k + 1
    real = others['image/segment'] != 0
    real[row] &= ~own
    others['image/patches'][real] = rng.uniform(-1, 1, (real.sum(), P * P * 3))
    other_places = np.ones(batch['box/valid'].shape, bool)
    other_places[g, c] = False
    others['box/tokens'][other_places] = rng.integers(1, FORMAT.vocab_size,
                                                      (other_places.sum(), T))
    text = others['text/segment'] != 0
    others['text/tokens'][text] = rng.integers(1, VOCAB, text.sum())
    np.testing.assert_allclose(box_ce(others)[g, c], before[g, c], atol=1e-5, rtol=1e-5)

    # Its own image's pixels change its loss.
    mine = {key: np.array(v) for key, v in batch.items()}
    mine['image/patches'][row, own] = rng.uniform(-1, 1, (own.sum(), P * P * 3))
    assert np.abs(box_ce(mine)[g, c] - before[g, c]).max() > 1e-4


def test_only_targets_count():
  model, params = td.model_and_params(**BOXES)
  batch = box_batches()['one_a_row']
  loss = jax.jit(lambda b: extras(model, params, b)['box_loss'])
  before = loss(inputs(batch))
  rng = np.random.default_rng(1)
  target, valid = batch['box/target'], batch['box/valid']
  after_last = np.cumsum(target[..., ::-1], axis=-1)[..., ::-1] == 0
  assert after_last[valid].any() and (~target[valid] & ~after_last[valid]).any()

  # A label after a sequence's last target, or in a place without a task, is
  # no target and the input of no target: the loss stays.
  labels = {k: np.array(v) for k, v in batch.items()}
  unread = after_last | ~valid[..., None]
  labels['box/tokens'][unread] = rng.integers(0, FORMAT.vocab_size, unread.sum())
  np.testing.assert_allclose(loss(inputs(labels)), before, rtol=1e-6)

  # A prompt token (the task, its text or box) is no target, but an input:
  # the loss changes, and is the reference's with that input.
  prompt = {k: np.array(v) for k, v in batch.items()}
  prompt_positions = ~target & ~after_last & valid[..., None]
  prompt_positions[..., 0] = False  # keep the task tokens
  prompt['box/tokens'][prompt_positions] = rng.integers(1, VOCAB, prompt_positions.sum())
  changed = loss(inputs(prompt))
  assert abs(changed - before) > 1e-4
  np.testing.assert_allclose(changed, reference_box_loss(model, params, inputs(prompt))[0],
                             rtol=1e-5)

  # Which positions are targets is read off box/target.
  more = {k: np.array(v) for k, v in batch.items()}
  more['box/target'] |= prompt_positions
  assert abs(loss(inputs(more)) - before) > 1e-4


# --- params, config -----------------------------------------------------------------

def test_the_decoder_params_are_unchanged_with_box_weight_0():
  shapes = lambda **o: jax.tree.map(lambda a: a.shape,
                                    two_towers.param_shapes(td.config(**o))['params'])
  plain, off, on = shapes(), shapes(box_weight=0.0, box_bins=7), shapes(**BOXES)
  assert off == plain
  assert plain['dec']['Embed']['embedding'] == (VOCAB, 32)
  vocab = VOCAB + BINS + 2
  assert on['dec']['Embed']['embedding'] == (vocab, 32)
  assert on['dec']['head']['kernel'] == (32, vocab)
  assert on['dec']['head']['bias'] == (vocab,)
  for name in ('Embed', 'head'):
    del on['dec'][name], plain['dec'][name]
  assert on == plain
  # Without box_weight the box rows of a batch are not run.
  off = td.config(box_weight=0.0)
  batch = inputs(box_batches()['one_a_row'])
  assert 'box_loss' not in jax.eval_shape(
      lambda p: extras(two_towers.TwoTowers(off), p, batch),
      two_towers.param_shapes(off)['params'])


def full_config(box_tasks, **decoder):
  c = config_lib.default_config()
  c.model = td.config(**decoder)
  c.input.box_tasks = box_tasks
  return c


@pytest.mark.parametrize('box_tasks,decoder,match', [
    (True, dict(box_weight=-1.0), 'model.decoder.box_weight must be >= 0'),
    (True, dict(box_weight=1.0, box_bins=0), 'model.decoder.box_bins'),
    (True, dict(weight=0.0, box_weight=1.0),
     r'model.decoder.box_weight > 0 needs the decoder: set model.decoder.weight'),
    (False, dict(box_weight=1.0), r'model.decoder.box_weight > 0 needs input.box_tasks'),
    (True, dict(box_weight=0.0), r'input.box_tasks=True needs model.decoder.box_weight'),
    (True, dict(weight=0.0), r'input.box_tasks=True needs model.decoder.box_weight'),
])
def test_config_errors_name_the_keys(box_tasks, decoder, match):
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(full_config(box_tasks, **decoder))


def test_box_tasks_and_their_loss_together_pass():
  config_lib.check_config(full_config(True, **BOXES))
  config_lib.check_config(full_config(False))
  siglip2 = config_lib.load_config_file(os.path.join(
      os.path.dirname(os.path.dirname(__file__)), 'configs', 'siglip2_navit.py:boxes'))
  config_lib.check_config(siglip2)
  assert siglip2.input.box_tasks and siglip2.model.decoder.box_weight > 0
  assert boxes.format_from_config(siglip2).vocab_size == 32_000 + 500 + 2


# --- FLOPs ----------------------------------------------------------------------------

def box_dummy_batch(spec):
  g, c = spec.groups, spec.captions
  return {**two_towers.dummy_batch(spec),
          'box/tokens': jax.ShapeDtypeStruct((g, c, T), jnp.int32),
          'box/target': jax.ShapeDtypeStruct((g, c, T), jnp.bool_),
          'box/valid': jax.ShapeDtypeStruct((g, c), jnp.bool_)}


def test_flops_count_the_box_rows():
  # C = 5 box rows a group beside R = 3 packed text rows.
  spec = batch_lib.BatchSpec(rows=4, tokens_per_row=16, slots=3, text_len=T,
                             patch_size=P, groups=2, captions_per_group=5,
                             text_rows=3)

  size = dict(width=64, mlp_dim=256, num_heads=2)
  on = td.config(**size, box_weight=1.0, box_bins=400)
  counted = flops.decoder_forward_flops(on, spec)
  measured = td.xla_flops(on, spec, box_dummy_batch(spec)) - td.xla_flops(
      td.config(weight=0.0), spec)
  # The analytic count leaves out element-wise work: a little under XLA's.
  assert 0.95 * measured < counted <= measured
  assert counted > flops.decoder_forward_flops(td.config(**size), spec)
  assert flops.training_flops(on, spec) - flops.training_flops(td.config(**size), spec) \
      == 3 * (counted - flops.decoder_forward_flops(td.config(**size), spec))


# --- sharding -------------------------------------------------------------------------

@pytest.mark.slow
def test_the_box_loss_sharded_over_data_and_fsdp_is_the_single_device_loss():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'mesh': [('data', 2), ('fsdp', 4)]}))
  model, params = td.model_and_params(**BOXES)
  host = box_batches(groups=8, rows=8, captions=4, text_rows=2)['packed']
  assert host['box/valid'].sum() >= 12
  box_loss = lambda p, batch: extras(model, p, batch)['box_loss']

  def sharded_loss_and_grads(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(box_loss)(params, batch)

  loss, grads = jax.jit(jax.value_and_grad(box_loss))(params, inputs(host))
  sharded_params = jax.device_put(params, sharding.param_shardings(
      params, [('.*', 'fsdp')], mesh))
  batch = sharding.make_global_batch(
      {k: v for k, v in host.items() if k != 'index'}, mesh)
  sharded, sharded_grads = jax.jit(sharded_loss_and_grads)(sharded_params, batch)
  np.testing.assert_allclose(sharded, loss, rtol=1e-5)
  td.assert_trees_close(sharded_grads, grads, atol=1e-6, rtol=1e-4)


# --- the trainer's wiring -----------------------------------------------------------------

def test_the_trainer_adds_the_weighted_box_loss_and_logs_it():
  c = full_config(True, box_weight=0.25, box_bins=BINS)
  c.input.patch_sizes, c.input.text_len = (P,), T
  c.batch_size = 4
  trainer = trainer_lib.Trainer(c, None, devices=jax.devices()[:1])
  _, params = td.model_and_params(**BOXES)
  batch = inputs(box_batches()['one_a_row'])
  without = {k: v for k, v in batch.items() if not k.startswith('box/')}
  assert 'box_loss' not in jax.eval_shape(trainer._loss, params, without)[1]
  # The same batch with no box task (box_loss 0) is the loss without it.
  no_task = dict(batch, **{'box/valid': jnp.zeros_like(batch['box/valid'])})
  loss_of = jax.jit(trainer._loss)
  loss, metrics = loss_of(params, batch)
  plain_loss, plain_metrics = loss_of(params, no_task)
  assert plain_metrics['box_loss'] == 0 and metrics['box_loss'] > 0
  np.testing.assert_allclose(loss - plain_loss, 0.25 * metrics['box_loss'],
                             rtol=1e-5, atol=1e-5)
  assert metrics['box_targets'] == batch['box/target'][batch['box/valid']].sum()
  line = metrics_lib.console_line(1, 2, {'loss': 1.0, 'caption_loss': 2.0, 'box_loss': 3.0})
  assert 'caption 2.0000 | box 3.0000' in line


def test_the_trainer_gives_the_pipeline_the_box_format(monkeypatch):
  made = []
  monkeypatch.setattr(pipeline_lib, 'Pipeline', lambda *a, **kw: made.append(kw))
  monkeypatch.setattr(trainer_lib.text.Tokenizer, 'from_config', lambda _: None)
  for box_tasks, decoder in ((True, BOXES), (False, {})):
    trainer_lib.make_pipeline(full_config(box_tasks, **decoder), None, rows=1)
  assert [kw['box_format'] for kw in made] == [FORMAT, None]
