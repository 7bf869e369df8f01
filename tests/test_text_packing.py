"""Text packing: a caption embeds the same packed or alone, nothing leaks
between the captions of a row, and the loss sees the same pairs."""

import dataclasses
import functools
import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit import config as config_lib
from lit_navit import losses
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.data import sources
from lit_navit.data import text as text_lib
from lit_navit.evaluate import demo_eval
from lit_navit.models import flops
from lit_navit.models import text
from lit_navit.models import two_towers
import eval_helpers
import tiny_config

PAD = 0
T = 12
ROWS = CAPTIONS = 6  # Text rows, and captions at most, of the property test.


def alone(captions, length=T):
  """One caption a row, padded: the unpacked layout."""
  out = np.full((len(captions), length), PAD, np.int32)
  for i, caption in enumerate(captions):
    out[i, :len(caption)] = caption
  return out


def pack(captions, rows=ROWS, slots=CAPTIONS, length=T):
  """Captions first-fit into one group of text rows: (tokens [1, rows, T],
  text.Packed), with `slots` caption places (those past the captions empty)."""
  tokens = np.full((rows, length), PAD, np.int32)
  segment, position = np.zeros_like(tokens), np.zeros_like(tokens)
  row_of, segment_of = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
  for c, caption in enumerate(captions):
    n = packing.caption_length(alone([caption], length)[0], PAD)
    r = next(r for r in range(rows) if np.count_nonzero(segment[r]) + n <= length)
    start = np.count_nonzero(segment[r])
    tokens[r, start:start + len(caption)] = caption
    segment_of[c] = segment[r].max() + 1
    segment[r, start:start + n] = segment_of[c]
    position[r, start:start + n] = np.arange(n)
    row_of[c] = r
  return tokens[None], text.Packed(segment[None], position[None],
                                   row_of[None], segment_of[None])


@functools.lru_cache(maxsize=None)
def tower(pool='last', causal=False):
  model = text.TextTransformer(vocab_size=16, max_len=T, width=32, depth=2,
                               mlp_dim=64, num_heads=2, pool=pool, out_dim=8,
                               causal=causal, pad_id=PAD)
  params = jax.jit(model.init)(jax.random.key(0), alone([[3, 4]]))
  return params, jax.jit(model.apply)


def embed_alone(captions, **kwargs):
  """L2-normalised embeddings (what the loss and eval see), one caption a
  row, as many rows as `pack` makes: the same matmul shapes."""
  params, apply = tower(**kwargs)
  rows = alone(captions + [[]] * (ROWS - len(captions)))
  return np.asarray(two_towers.l2_normalize(apply(params, rows)))[:len(captions)]


def embed_packed(captions, **kwargs):
  params, apply = tower(**kwargs)
  tokens, packed = pack(captions)
  return np.asarray(two_towers.l2_normalize(apply(params, tokens, packed)))


def random_captions(lengths, seed):
  # Ids 1..15: no pad inside a caption; a length-0 caption is all padding.
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 16, n).tolist() for n in lengths]


@pytest.mark.parametrize('pool,causal', [('last', False), ('first', False),
                                         ('map', False), ('mean', False),
                                         ('max', False), ('last', True)])
@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(lengths=st.lists(st.integers(0, T), min_size=1,
                                   max_size=CAPTIONS),
                  seed=st.integers(0, 2 ** 16))
def test_a_caption_embeds_the_same_packed_or_alone(pool, causal, lengths, seed):
  captions = random_captions(lengths, seed)
  packed = embed_packed(captions, pool=pool, causal=causal)
  assert packed.shape == (CAPTIONS, 8)
  np.testing.assert_allclose(packed[:len(captions)],
                             embed_alone(captions, pool=pool, causal=causal),
                             atol=1e-6, rtol=0)
  assert np.all(packed[len(captions):] == 0)  # Empty caption places.


@pytest.mark.parametrize('pool', ['last', 'first', 'map', 'mean', 'max'])
def test_no_caption_of_a_row_sees_another(pool):
  # Three captions share row 0; the middle one changes, its length too.
  before = [[5, 9, 3], [7, 2, 2, 4], [4, 6], [1, 1, 1, 1, 1]]
  after = [[5, 9, 3], [8, 8], [4, 6], [1, 1, 1, 1, 1]]
  a, b = embed_packed(before, pool=pool), embed_packed(after, pool=pool)
  assert pack(before)[1].row[0, :3].tolist() == [0, 0, 0]
  np.testing.assert_allclose(b[[0, 2, 3]], a[[0, 2, 3]], atol=1e-6, rtol=0)
  assert not np.allclose(a[1], b[1], atol=1e-3)


def test_packed_rows_need_masked_padding_and_config_says_so():
  model = text.TextTransformer(16, T, 32, 1, 64, 2, pad_id=PAD, mask_padding=False)
  with pytest.raises(ValueError, match='mask_padding=True'):
    model.init(jax.random.key(0), *pack([[3, 4]]))
  config = config_lib.default_config()
  config.input.text_packing = True
  config.model.text.mask_padding = False
  with pytest.raises(ValueError, match=r'input.text_packing=True .* '
                     r'model.text.mask_padding=False'):
    config_lib.check_config(config)


# --- the batch and the loss ---------------------------------------------------

def image(rng, side, caption, index):
  pixels = rng.uniform(0, 255, (side * 4, side * 4, 3)).astype(np.uint8)
  return packing.PackedImage(patches_lib.patchify(pixels, 4), alone([caption])[0],
                             index)


def batches(seed=0):
  """The same pairs, captions one a row and packed (2 groups of 2 rows)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, 14)
  lengths[3] = 0  # An all-pad caption still pairs with its image.
  images = [image(rng, int(rng.integers(1, 4)), c, i)
            for i, c in enumerate(random_captions(lengths, seed))]
  spec = batch_lib.BatchSpec(rows=4, tokens_per_row=24, slots=4, text_len=T,
                             patch_size=4, groups=2, captions_per_group=7)
  packed_spec = dataclasses.replace(spec, text_rows=4)
  sizes = [len(i.patches) for i in images]
  lengths = [packing.caption_length(i.tokens, PAD) for i in images]
  plan = packing.plan(sizes, 4, 24, 4, groups=2, captions=7,
                      caption_lengths=lengths, text_rows=4, text_len=T)
  rows = [[images[p] for p in row] for row in plan.rows]
  packed_rows = [[packing.PackedImage(images[p].patches, images[p].tokens,
                                      images[p].index, plan.text_row[p])
                  for p in row] for row in plan.rows]
  one_a_row = packing.pack_batch(rows, spec, PAD)
  packed = packing.pack_batch(packed_rows, packed_spec, PAD)
  batch_lib.validate_batch(one_a_row, spec, PAD)
  batch_lib.validate_batch(packed, packed_spec, PAD)
  return one_a_row, packed


def test_the_packer_places_every_caption_of_its_pairs():
  one_a_row, packed = batches()
  assert one_a_row['valid'].sum() == packed['text/valid'].sum() >= 10
  assert batch_lib.spec_of(packed).text_rows == 4
  for g, c in zip(*np.nonzero(packed['text/valid'])):
    row, seg = packed['text/row'][g, c], packed['text/row_segment'][g, c]
    mine = packed['text/segment'][g, row] == seg
    caption = packed['text/tokens'][g, row][mine]
    expected = one_a_row['text/tokens'][g, c]
    assert caption.tolist() == expected[:len(caption)].tolist()
    assert np.all(expected[len(caption):] == PAD)


def test_the_validator_checks_the_packed_fields():
  _, packed = batches()
  g, c = 0, 0
  row = packed['text/row'][g, c]
  assert not packed['text/segment'][g, 3].any()  # Text row 3 is empty.
  for key, change, message in [
      ('text/position', lambda b: b.__setitem__((g, row, 1), 5), 'restart at 0'),
      ('text/segment', lambda b: b.__setitem__((g, row, 0), 2), 'runs 1..n'),
      ('text/row_segment', lambda b: b.__setitem__((g, c), 9), 'exactly once'),
      ('text/tokens', lambda b: b.__setitem__((g, 3, 0), 3), 'pad id')]:
    broken = {k: np.array(v) for k, v in packed.items()}
    change(broken[key])
    with pytest.raises(ValueError, match=message):
      batch_lib.validate_batch(broken, pad_id=PAD)


def tiny_model(pool):
  config = two_towers.default_config()
  config.image.variant = 'mu/4'
  config.image.max_grid = 8
  config.text.variant = 'mu'
  config.text.vocab_size = 16
  config.text.max_len = T
  config.text.pool = pool
  config.embed_dim = 16
  return two_towers.TwoTowers(config)


@pytest.mark.parametrize('pool', ['last', 'map'])
def test_loss_and_gradients_are_those_of_the_same_pairs_unpacked(pool):
  one_a_row, packed = batches()
  inputs = lambda b: {k: jnp.asarray(v) for k, v in b.items() if k != 'index'}
  model = tiny_model(pool)
  params = jax.jit(model.init)(jax.random.key(1), inputs(one_a_row))['params']

  @jax.jit
  def loss_and_grads(params, batch):
    def loss(params):
      zimg, ztxt, extras = model.apply({'params': params}, batch)
      return losses.sigmoid_loss_dense(zimg, ztxt, extras['valid'],
                                       params['t'][0], params['b'][0])[0]
    return jax.value_and_grad(loss)(params)

  loss, grads = loss_and_grads(params, inputs(one_a_row))
  packed_loss, packed_grads = loss_and_grads(params, inputs(packed))
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  assert any(np.abs(g).max() > 1e-4 for g in jax.tree.leaves(grads['txt']))


# --- the pipeline, the trainer's figures and evaluation ------------------------

def test_the_pipeline_packs_the_caption_of_each_pair():
  config = tiny_config.get_config()
  config.input.text_packing = True
  config.input.text_len = 64  # Synthetic captions: 14 tokens on average.
  config.input.text_rows_per_caption = 0.25  # 4 text rows for 16 captions.
  source = sources.make_source(config.input.source)
  tokenizer = text_lib.Tokenizer.from_config(config.input)
  pad = tokenizer.pad_id
  with trainer_lib.make_pipeline(config, source, rows=8, groups=2) as pipe:
    for _ in range(3):
      batch = next(pipe)
      spec = batch_lib.spec_of(batch)
      batch_lib.validate_batch(batch, spec, pad)
      assert spec.text_rows < spec.captions
      for g, c in zip(*np.nonzero(batch['text/valid'])):
        row, k = divmod(int(batch['text/slot'][g, c]), spec.slots)
        index = batch['index'][g * spec.rows_per_group + row, k]
        expected = tokenizer.encode([source[index].caption])[0]
        mine = batch['text/segment'][g, batch['text/row'][g, c]] == (
            batch['text/row_segment'][g, c])
        caption = batch['text/tokens'][g, batch['text/row'][g, c]][mine]
        assert caption.tolist() == expected[:caption.size].tolist()
        assert np.all(expected[caption.size:] == pad)
    stats = pipe.stats
  # The text rows fill up, and hold nearly every caption a group can pair.
  assert stats['text_padding_fraction'] < 0.2
  assert stats['text_rows_per_caption'] < config.input.text_rows_per_caption
  assert stats['empty_caption_fraction'] < 0.05


def test_evaluation_is_the_same_with_text_packing_on_or_off(tmp_path):
  # Zero-shot, retrieval, export and query: evaluation embeds texts one a
  # row, so whether training packs its captions must not change a number.
  config = tiny_config.get_config()
  params = eval_helpers.init_params(config.model, config.input.text_len)
  reports = {}
  for on in (False, True):
    config.input.text_packing = on
    reports[on] = demo_eval.evaluate_and_export(
        config, params, str(tmp_path / str(on)), num_examples=12, batch_rows=4)
  off, on = reports[False], reports[True]
  for key in ('zero_shot_top1', 'image_to_text_r1', 'text_to_image_r1', 'query'):
    assert on[key] == off[key], key
  for kind in ('img_emb', 'text_emb'):
    for name in sorted(os.listdir(os.path.join(off['export_dir'], kind))):
      np.testing.assert_allclose(
          np.load(os.path.join(on['export_dir'], kind, name)).astype(np.float32),
          np.load(os.path.join(off['export_dir'], kind, name)).astype(np.float32),
          atol=1e-6, rtol=0)


def test_flops_count_the_text_rows_encoded():
  config = two_towers.default_config()
  spec = batch_lib.BatchSpec(rows=8, tokens_per_row=256, slots=16, text_len=64,
                             patch_size=16, captions_per_group=35)
  packed = dataclasses.replace(spec, text_rows=8)
  one_a_row, rows = (flops.text_forward_flops(config, s) for s in (spec, packed))
  head = 35 * 2 * 768 * config.embed_dim  # Per caption either way.
  assert (rows - head) * 35 == pytest.approx((one_a_row - head) * 8, rel=1e-12)
