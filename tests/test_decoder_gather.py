"""The decoder's gathered cross-attention (decoder.cross_layout): each query
row reads only its own image's row, and the result is the old formulation's,
kept here only as a reference: every caption token of a group against all
the group's image tokens, masked by group-wide ids. Both text layouts, box
rows, several image rows a group; isolation per image row; the kernel's
shapes; splash (Pallas interpreter) on the gathered rows; the FLOP count.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit.data import batch as batch_lib
from lit_navit.models import attention as attention_lib
from lit_navit.models import decoder
from lit_navit.models import flops
from lit_navit.models import two_towers
import test_decoder as td
import test_decoder_boxes as tdb
from test_decoder import PAD, P, inputs
from test_decoder_boxes import BOXES

ROWS, GROUPS = 6, 2  # Three image rows a group.


@functools.lru_cache(maxsize=None)
def box_batches():
  return tdb.box_batches(groups=GROUPS, rows=ROWS, captions=9, text_rows=4)


def test_the_batches_spread_a_group_over_rows_and_share_rows():
  for batch in box_batches().values():
    spec = batch_lib.spec_of(batch)
    assert spec.rows_per_group == 3
    rows = [(g, row) for g, _, row, _, _ in td.captions_of(batch)]
    assert len(set(rows)) < len(rows)  # captions of images sharing a row
    for group in range(GROUPS):  # in groups of two image rows or more
      assert len({row for g, row in rows if g == group}) >= 2
    assert batch['box/valid'].sum() >= 8


# --- the old formulation, as the reference ----------------------------------------

def old_cross_ids(batch, with_boxes):
  """The old ids (q [G, N*T], kv [G, B/G*L]): an image token of slot k in
  the group's row r has r*E + k + 1 (padding 0), a token of a valid caption
  or task its slot's plus 1, any other token the group's first image token's."""
  segment = batch['image/segment']
  slots = batch['image/grid'].shape[1]
  groups, places = batch['text/slot'].shape
  layout = decoder.caption_layout(batch, PAD)
  caption_place = layout.caption
  mine = (caption_place >= 0) & decoder.per_caption(batch['text/valid'], caption_place)
  slot = decoder.per_caption(batch['text/slot'], caption_place)
  if with_boxes:
    length = layout.tokens.shape[-1]
    box_mine = jnp.broadcast_to(batch['box/valid'][..., None], (groups, places, length))
    box_slot = jnp.broadcast_to(batch['text/slot'][..., None], (groups, places, length))
    mine = jnp.concatenate([mine, box_mine], axis=1)
    slot = jnp.concatenate([slot, box_slot], axis=1)
  batch_rows, tokens_per_row = segment.shape
  row_in_group = (jnp.arange(batch_rows) % (batch_rows // groups))[:, None]
  kv = jnp.where(segment > 0, row_in_group * slots + segment, 0).reshape(groups, -1)
  q = jnp.where(mine, slot + 1, kv[:, :1, None]).reshape(groups, -1)
  return attention_lib.Segments(q, kv)


def old_attention(ids):
  """A stand-in for decoder.gathered_attention: the group-wide masked grid."""
  def attend(q, k, v, layout, *, kernel):
    del layout
    groups = ids.q.shape[0]
    rows, length, heads, head_dim = q.shape
    per_group = lambda a: a.reshape(groups, -1, heads, head_dim)
    out = attention_lib.get(kernel)(per_group(q), per_group(k), per_group(v), ids)
    return out.reshape(rows, length, heads, head_dim)
  return attend


def losses(model, params, batch, old: bool, monkeypatch):
  """((caption loss + box loss, per-token CE {'caption', 'box'}), the
  gradient of the loss); `old`: the old formulation, traced with it."""
  def total(params, batch):
    def ce(module, batch):
      _, image_tokens = module._slot_embeddings(batch, return_tokens=True)
      return module.decoder_cross_entropy(image_tokens, batch)
    per_token = model.apply({'params': params}, batch, method=ce)
    loss = sum(jnp.sum(ce) / jnp.sum(targets) for ce, targets in per_token.values())
    return loss, {k: v[0] for k, v in per_token.items()}

  with monkeypatch.context() as patch:
    if old:
      patch.setattr(decoder, 'gathered_attention',
                    old_attention(old_cross_ids(batch, with_boxes=True)))
    return jax.jit(jax.value_and_grad(total, has_aux=True))(params, batch)


@pytest.mark.parametrize('layout', ['one_a_row', 'packed'])
def test_the_gathered_cross_attention_is_the_old_masked_one(layout, monkeypatch):
  model, params = td.model_and_params(**BOXES)
  batch = inputs(box_batches()[layout])
  (loss, ce), grads = losses(model, params, batch, False, monkeypatch)
  (old_loss, old_ce), old_grads = losses(model, params, batch, True, monkeypatch)
  np.testing.assert_allclose(loss, old_loss, rtol=1e-6)
  for kind in ('caption', 'box'):
    np.testing.assert_allclose(ce[kind], old_ce[kind], atol=1e-5, rtol=1e-5)
  td.assert_trees_close(grads, old_grads, atol=1e-6, rtol=1e-4)
  assert np.abs(grads['dec']['block_0']['CrossAttention']['key']['kernel']).max() > 1e-4


# --- isolation per image row ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jitted_ce():
  model, params = td.model_and_params(**BOXES)

  def ce(module, batch):
    _, image_tokens = module._slot_embeddings(batch, return_tokens=True)
    return {k: v[0] for k, v in module.decoder_cross_entropy(image_tokens, batch).items()}
  return jax.jit(lambda batch: model.apply({'params': params}, batch, method=ce))


def place_ce(batch, g, c):
  """Caption place c of group g's per-token CE (caption, then box task)."""
  ce = jax.tree.map(np.asarray, jitted_ce()(inputs(batch)))
  if 'text/segment' in batch:
    row = batch['text/row'][g, c]
    mine = batch['text/segment'][g, row] == batch['text/row_segment'][g, c]
    caption = ce['caption'][g, row][mine]
  else:
    caption = ce['caption'][g, c]
  return np.concatenate([caption, ce['box'][g, c]])


def with_new_pixels(batch, row, segment_id, seed):
  out = {key: np.array(v) for key, v in batch.items()}
  image = out['image/segment'][row] == segment_id
  out['image/patches'][row, image] = np.random.default_rng(seed).uniform(
      -1, 1, (image.sum(), P * P * 3))
  return out


@pytest.mark.parametrize('layout', ['one_a_row', 'packed'])
def test_a_caption_sees_neither_its_row_neighbour_nor_another_row_of_its_group(layout):
  batch = box_batches()[layout]
  spec = batch_lib.spec_of(batch)
  segment = batch['image/segment']
  # A caption (with a box task) whose image shares its row, in a group of
  # several rows.
  g, c, row, k = next(
      (g, c, row, k) for g, c, row, k in tdb.places(batch)
      if len(set(segment[row][segment[row] > 0])) > 1)
  before = place_ce(batch, g, c)
  neighbour = next(s for s in np.unique(segment[row]) if s not in (0, k + 1))
  other_row = next(r for r in range(g * spec.rows_per_group, (g + 1) * spec.rows_per_group)
                   if r != row and np.any(segment[r] == 1))
  for changed in (with_new_pixels(batch, row, neighbour, 1),
                  with_new_pixels(batch, other_row, 1, 2)):
    np.testing.assert_allclose(place_ce(changed, g, c), before, atol=1e-5, rtol=1e-5)
  assert np.abs(place_ce(with_new_pixels(batch, row, k + 1, 3), g, c) - before).max() > 1e-4


# --- the kernel's shapes -----------------------------------------------------------------

def test_each_query_row_reads_one_image_row():
  # The kernel gets one query row of T slots a caption place and a box task
  # (G*2C rows), against L keys (one image row), not the group's B/G*L.
  batch = inputs(box_batches()['packed'])
  spec = batch_lib.spec_of(batch)
  shapes = []

  def spy(q, k, v, mask):
    if isinstance(mask, attention_lib.Segments):  # the cross-attention
      shapes.append((q.shape, k.shape, mask.q.shape, mask.kv.shape))
    return attention_lib.dense_attention(q, k, v, mask)

  model, params = td.model_and_params(**BOXES)
  spied = dataclasses.replace(two_towers.caption_decoder(model.config),
                              attention=spy)

  def run(params, batch):
    _, image_tokens = model.apply({'params': params}, batch, True,
                                  method=model._slot_embeddings)
    return spied.apply({'params': params['dec']}, image_tokens, batch['image/segment'],
                       spec.slots, decoder.caption_layout(batch, PAD), batch['text/slot'],
                       batch['text/valid'], boxes=decoder.box_sequences(batch))
  jax.eval_shape(run, params, batch)
  rows = spec.groups * 2 * spec.captions_per_group
  heads = model.config.decoder.num_heads
  head_dim = model.config.decoder.width // heads
  assert shapes == [((rows, spec.text_len, heads, head_dim),
                     (rows, spec.tokens_per_row, heads, head_dim),
                     (rows, spec.text_len), (rows, spec.tokens_per_row))] * 2


# --- splash on the gathered rows -------------------------------------------------------

def test_splash_takes_the_gathered_rows(monkeypatch):
  # Pallas' interpreter on CPU, at T = L = 128 (its tiles): one group of two
  # text rows whose captions are swapped into the other query row, each
  # against the image row the other text row would not read.
  monkeypatch.setitem(attention_lib.ATTENTION_FNS, 'splash', functools.partial(
      attention_lib.splash_attention, interpret=True))
  length, heads, head_dim = decoder.SPLASH_TILE, 2, 8
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, heads, head_dim)), jnp.float32)
             for _ in range(3))
  order = jnp.concatenate([jnp.arange(length, 2 * length), jnp.arange(length)])
  q_ids = np.ones((2, length), np.int32)
  q_ids[0, 100:] = 2  # The row's second image: a masked block of keys.
  kv_ids = np.zeros((2, length), np.int32)
  kv_ids[:, :90], kv_ids[0, 90:120] = 1, 2  # then padding (ids per query row)
  layout = decoder.CrossLayout(order[None], order[None], jnp.array([[1, 0]]),
                               attention_lib.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids)))

  def attend(kernel):
    return lambda q, k, v: decoder.gathered_attention(q, k, v, layout, kernel=kernel)
  np.testing.assert_allclose(attend('splash')(q, k, v), attend('dense')(q, k, v), atol=2e-6)
  grads = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)
  for ours, dense in zip(grads(attend('splash')), grads(attend('dense'))):
    np.testing.assert_allclose(ours, dense, atol=5e-6)


def test_splash_falls_back_to_dense_on_short_rows(monkeypatch):
  # T = 8, L = 24: no splash tile fits; the loss is the dense one.
  model, params = td.model_and_params(**BOXES)
  batch = inputs(box_batches()['packed'])
  loss = lambda m: jax.jit(lambda b: m.apply({'params': params}, b)[2]['box_loss'])(batch)
  dense = loss(model)

  def refuse(*_, **__):
    raise AssertionError('splash on rows it cannot tile')
  monkeypatch.setitem(attention_lib.ATTENTION_FNS, 'splash', refuse)
  np.testing.assert_allclose(loss(two_towers.TwoTowers(td.config(**BOXES, attention='splash'))),
                             dense, rtol=1e-6)


# --- FLOPs ---------------------------------------------------------------------------

def test_flops_count_the_gathered_cross_attention():
  # Eight image rows in one group, packed text and box rows: the old
  # group-wide grid would be several times the decoder's count.
  spec = batch_lib.BatchSpec(rows=8, tokens_per_row=32, slots=3, text_len=td.T,
                             patch_size=P, groups=1, captions_per_group=12,
                             text_rows=4)

  on = td.config(width=64, mlp_dim=256, num_heads=2, **BOXES)
  counted = flops.decoder_forward_flops(on, spec)
  measured = td.xla_flops(on, spec, tdb.box_dummy_batch(spec)) - td.xla_flops(
      td.config(weight=0.0), spec)
  # The analytic count leaves out element-wise work: a little under XLA's.
  assert 0.95 * measured < counted <= measured
