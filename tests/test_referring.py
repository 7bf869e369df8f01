"""LocCa's referring-expression accuracy (evaluate/referring.py): IoU, greedy
ARef decoding against a dense sequence-by-sequence reference, location
tokens only, per-image isolation in packed rows, the scores, and the
trainer's evals.box_accuracy (config check, held-out batches, logs).

The box batches are the decoder tests' packed batches with ARef and GCap
sequences built by data/boxes.py's own builders.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_navit import config as config_lib
from lit_navit import metrics as metrics_lib
from lit_navit import trainer as trainer_lib
from lit_navit.data import boxes
from lit_navit.evaluate import referring
import test_decoder as td
import test_decoder_boxes as tdb
import tiny_config
from test_decoder import PAD, T, VOCAB, P, inputs
from test_decoder_boxes import BINS, BOXES, FORMAT

EOS = 1


# --- IoU ----------------------------------------------------------------------

@pytest.mark.parametrize('a,b,expected', [
    ((0, 0, .5, .5), (.25, .25, .75, .75), .0625 / (.25 + .25 - .0625)),
    ((.1, .2, .6, .4), (.1, .2, .6, .4), 1.0),
    ((0, 0, 1, 1), (0, 0, .5, 1), .5),               # one inside the other
    ((0, 0, .2, .4), (.1, .3, .5, .5), .01 / (.08 + .08 - .01)),
    ((0, 0, .2, .2), (.5, .5, .7, .7), 0.0),         # apart on both axes
    ((0, 0, .2, .2), (0, .2, .2, .4), 0.0),          # sharing an edge
    ((.5, .5, .4, .6), (.3, .3, .8, .8), 0.0),       # max < min: empty
    ((.3, .3, .3, .3), (.3, .3, .3, .3), 0.0),       # no union at all
])
def test_iou_of_hand_computed_boxes(a, b, expected):
  got = referring.iou(np.array([a, b]), np.array([b, a]))
  np.testing.assert_allclose(got, [expected, expected], rtol=1e-6, atol=1e-7)


def test_location_boxes_are_the_bin_centres_of_the_token_format():
  rng = np.random.default_rng(0)
  box = np.sort(rng.uniform(0, 1, (2, 2)), axis=1).T.reshape(-1)  # ymin, xmin, ymax, xmax
  tokens = np.full((1, 1, T), PAD, np.int32)
  tokens[0, 0, 2:6] = boxes.location_tokens(box, FORMAT)
  got = referring.location_boxes(jnp.asarray(tokens), jnp.array([[2]]), FORMAT)[0, 0]
  np.testing.assert_allclose(got, boxes.dequantise(boxes.quantise(box, BINS), BINS),
                             rtol=1e-6)
  assert np.abs(np.asarray(got) - box).max() <= 0.5 / BINS + 1e-6


# --- batches --------------------------------------------------------------------

def random_box(rng):
  """A box in the image's top-left part, at least two bins each way."""
  ymin, xmin = rng.uniform(0, .2, 2)
  return ymin, xmin, ymin + rng.uniform(.25, .4), xmin + rng.uniform(.25, .4)


def with_tasks(batch, seed=0):
  """`batch` with a box task at most valid caption places, two ARef to one
  GCap, sequences as data/boxes.py builds them."""
  rng = np.random.default_rng(seed)
  valid = np.asarray(batch['text/valid'])
  tokens = np.full(valid.shape + (T,), PAD, np.int32)
  target = np.zeros(valid.shape + (T,), bool)
  has_box = valid & (rng.uniform(size=valid.shape) < 0.9)
  for n, (g, c) in enumerate(zip(*np.nonzero(has_box))):
    text = rng.integers(2, VOCAB, int(rng.integers(1, 4)))
    if n % 3 == 2:
      sequence = boxes.gcap_sequence(text, random_box(rng), FORMAT, T, PAD, EOS)
    else:
      sequence = boxes.aref_sequence(text, random_box(rng), FORMAT, T, PAD)
    tokens[g, c], target[g, c] = sequence
  return dict(batch, **{'box/tokens': tokens, 'box/target': target,
                        'box/valid': has_box})


def aref_batch(seed=0):
  return with_tasks(td.batches()['packed'], seed)


def test_the_batch_has_aref_and_gcap_tasks_in_shared_rows():
  batch = aref_batch()
  places = np.asarray(referring.aref_places(batch, FORMAT))
  gcap = batch['box/valid'] & (batch['box/tokens'][..., 0] == FORMAT.gcap_token)
  assert places.sum() >= 6 and gcap.sum() >= 3
  rows = [row for g, c, row, _ in tdb.places(batch) if places[g, c]]
  assert len(set(rows)) < len(rows)  # ARef images that share a packed row


# --- greedy decoding ----------------------------------------------------------------

@jax.jit
def reference_location_scores(dec, image_tokens, m, tokens, position):
  """log p of each location token at `position` of one box row, on its own
  image's m tokens alone (td.reference_ce: dense, a plain causal mask)."""
  def log_p(token):
    return -td.reference_ce(dec, image_tokens, m, tokens.at[position].set(token), T)[position]
  return jax.vmap(log_p)(FORMAT.vocab_offset + jnp.arange(BINS))


def reference_decoding(model, params, batch):
  """{(g, c): tokens [T]} of each ARef, decoded greedily sequence by
  sequence, position by position."""
  image_tokens = model.apply({'params': params}, batch, True,
                             method=model._slot_embeddings)[1]
  segment = np.asarray(batch['image/segment'])
  places = np.asarray(referring.aref_places(batch, FORMAT))
  out = {}
  for g, c, row, k in tdb.places(batch):
    if not places[g, c]:
      continue
    own = np.flatnonzero(segment[row] == k + 1)
    padded = np.pad(own, (0, segment.shape[1] - len(own)))
    first = int(np.argmax(batch['box/target'][g, c]))
    tokens = np.array(batch['box/tokens'][g, c])
    tokens[first:] = PAD
    for position in range(first, first + 4):
      scores = reference_location_scores(params['dec'], image_tokens[row, padded],
                                         len(own), jnp.asarray(tokens), position)
      tokens[position] = FORMAT.vocab_offset + int(np.argmax(scores))
    out[g, c] = tokens
  return out


@jax.jit
def decoded(params, batch):
  return referring.decode_aref(td.model_and_params(**BOXES)[0], params, batch)


def test_greedy_decoding_is_the_dense_reference_argmax_sequence():
  model, params = td.model_and_params(**BOXES)
  batch = inputs(aref_batch())
  got = np.asarray(decoded(params, batch))
  reference = reference_decoding(model, params, batch)
  for (g, c), tokens in reference.items():
    np.testing.assert_array_equal(got[g, c], tokens, err_msg=f'place {(g, c)}')
  # The test can tell steps apart: the boxes are not all one token.
  assert len({int(t) for tokens in reference.values() for t in tokens[-4:]
              if t != PAD}) > 2
  # Every other place (GCap, no task) keeps its tokens.
  places = np.asarray(referring.aref_places(batch, FORMAT))
  np.testing.assert_array_equal(got[~places], np.asarray(batch['box/tokens'])[~places])


def test_only_location_tokens_are_generated_and_the_prompt_stays():
  _, params = td.model_and_params(**BOXES)
  # A head biased to a text token and the aref token: an argmax over the
  # whole vocabulary would write them.
  bias = params['dec']['head']['bias'].at[3].add(50.0).at[FORMAT.aref_token].add(60.0)
  biased = dict(params, dec=dict(params['dec'], head=dict(params['dec']['head'], bias=bias)))
  batch = inputs(aref_batch())
  got = np.asarray(decoded(biased, batch))
  places = np.asarray(referring.aref_places(batch, FORMAT))
  target = np.asarray(batch['box/target'])
  generated = got[places][target[places]]
  assert generated.size == 4 * places.sum()
  assert np.all((generated >= FORMAT.vocab_offset)
                & (generated < FORMAT.vocab_offset + BINS))
  np.testing.assert_array_equal(got[~target], np.asarray(batch['box/tokens'])[~target])


def test_a_prediction_sees_only_its_own_image_and_prompt():
  _, params = td.model_and_params(**BOXES)
  batch = aref_batch()
  before = np.asarray(decoded(params, inputs(batch)))
  places = np.asarray(referring.aref_places(batch, FORMAT))
  rng = np.random.default_rng(3)
  changed_own = 0
  for g, c, row, k in [p for p in tdb.places(batch) if places[p[0], p[1]]]:
    # Every other image (its row's and the others'), every other place's
    # sequence, its own true box and every caption change: its box stays.
    others = {key: np.array(v) for key, v in batch.items()}
    own = batch['image/segment'][row] == k + 1
    real = others['image/segment'] != 0
    real[row] &= ~own
    others['image/patches'][real] = rng.uniform(-1, 1, (real.sum(), P * P * 3))
    other_places = np.ones(places.shape, bool)
    other_places[g, c] = False
    others['box/tokens'][other_places] = rng.integers(2, VOCAB, (other_places.sum(), T))
    first = int(np.argmax(batch['box/target'][g, c]))
    others['box/tokens'][g, c, first:first + 4] = rng.integers(
        FORMAT.vocab_offset, FORMAT.vocab_offset + BINS, 4)
    text = others['text/segment'] != 0
    others['text/tokens'][text] = rng.integers(1, VOCAB, text.sum())
    np.testing.assert_array_equal(np.asarray(decoded(params, inputs(others)))[g, c],
                                  before[g, c])
    # Its own image's pixels are read.
    mine = {key: np.array(v) for key, v in batch.items()}
    mine['image/patches'][row, own] = rng.uniform(-1, 1, (own.sum(), P * P * 3)) * 30
    changed_own += not np.array_equal(np.asarray(decoded(params, inputs(mine)))[g, c],
                                      before[g, c])
  assert changed_own >= 2


# --- the scores ---------------------------------------------------------------------

def far_boxes(batch):
  """box/tokens with every box moved to the bottom-right corner, which no
  true box (top-left, random_box) reaches."""
  tokens = np.array(batch['box/tokens'])
  places = np.asarray(referring.aref_places(batch, FORMAT))
  first = np.argmax(batch['box/target'], axis=-1)
  far = boxes.location_tokens((.9, .9, .99, .99), FORMAT)
  for g, c in zip(*np.nonzero(places)):
    tokens[g, c, first[g, c]:first[g, c] + 4] = far
  return tokens


def scores_with(monkeypatch, decoding):
  """box_scores of a batch with the decoding replaced by `decoding(batch)`."""
  monkeypatch.setattr(referring, 'decode_aref', lambda model, params, b: decoding(b))
  model, params = td.model_and_params(**BOXES)
  return jax.device_get(referring.box_scores(model, params, inputs(aref_batch())))


def test_the_scores_of_an_oracle_and_of_far_boxes(monkeypatch):
  batch = aref_batch()
  places = np.asarray(referring.aref_places(batch, FORMAT))
  oracle = scores_with(monkeypatch, lambda b: b['box/tokens'])
  assert oracle['tasks'] == places.sum() == (
      batch['box/tokens'][batch['box/valid']][:, 0] == FORMAT.aref_token).sum()
  assert oracle['correct'] == oracle['tasks']
  np.testing.assert_allclose(oracle['iou'], oracle['tasks'], rtol=1e-6)
  far = scores_with(monkeypatch, lambda b: jnp.asarray(far_boxes(batch)))
  assert far['correct'] == 0 and far['iou'] == 0 and far['tasks'] == oracle['tasks']


def test_the_threshold_is_iou_at_least_one_half():
  # 4 bins: the bin centres 1/8, 3/8, 5/8, 7/8 are exact in float32, so
  # the IoU is exactly 1/2 (correct) or 1/3 (not).
  fmt = boxes.BoxFormat(VOCAB, 4)
  def one_task(*bins):
    tokens = np.full((1, 1, T), PAD, np.int32)
    tokens[0, 0, :7] = [fmt.aref_token, 5, 6, *(fmt.vocab_offset + np.array(bins))]
    target = np.zeros((1, 1, T), bool)
    target[0, 0, 3:7] = True
    return {'box/tokens': jnp.asarray(tokens), 'box/target': jnp.asarray(target),
            'box/valid': jnp.ones((1, 1), bool)}
  truth = one_task(0, 0, 2, 1)
  for predicted, correct, overlap in (((0, 0, 1, 1), 1, 1 / 2), ((0, 0, 1, 2), 0, 1 / 3)):
    scores = referring.aref_scores(one_task(*predicted)['box/tokens'], truth, fmt)
    assert (int(scores['tasks']), int(scores['correct'])) == (1, correct)
    np.testing.assert_allclose(scores['iou'], overlap, rtol=1e-6)


# --- the trainer ----------------------------------------------------------------------

def eval_config(**evals):
  c = tiny_config.get_config('steps=2')
  c.input.box_tasks = True
  c.model.decoder.update(dict(weight=1.0, width=32, depth=1, mlp_dim=64, num_heads=2,
                              box_weight=1.0, box_bins=100))
  c.model.text.max_len = c.input.text_len = 10
  c.evals.heldout = c.input.source.copy_and_resolve_references()
  c.evals.heldout_batches = 1
  c.evals.update(evals)
  return c


@pytest.mark.parametrize('change,match', [
    (dict(), None),
    (dict(evals=dict(heldout=dict(kind=''))), 'evals.box_accuracy=True needs'),
    (dict(decoder=dict(box_weight=0.0), box_tasks=False), 'evals.box_accuracy=True needs'),
    (dict(decoder=dict(weight=0.0, box_weight=0.0), box_tasks=False),
     'evals.box_accuracy=True needs'),
])
def test_box_accuracy_needs_box_tasks_and_heldout_batches(change, match):
  c = eval_config(box_accuracy=True)
  c.model.decoder.update(change.get('decoder', {}))
  c.evals.heldout.update(change.get('evals', {}).get('heldout', {}))
  c.input.box_tasks = change.get('box_tasks', True)
  if match is None:
    config_lib.check_config(c)
    trainer_lib.check_evals(c)
    return
  with pytest.raises(ValueError, match=match) as error:
    trainer_lib.check_evals(c)
  for key in ('model.decoder.box_weight', 'input.box_tasks', 'evals.heldout.kind'):
    assert key in str(error.value)


def test_the_trainer_logs_box_accuracy_on_heldout_aref_tasks(tmp_path, monkeypatch, capsys):
  trainer = trainer_lib.Trainer(eval_config(box_accuracy=True, caption_perplexity=True),
                                None, devices=jax.devices()[:1])
  params = trainer._init_fn()['params']
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  results = trainer._evaluate(writer, 2, {'params': params})
  writer.close()
  assert results['eval/aref_tasks'] >= 2  # the held-out batches carry ARef tasks
  assert 0 <= results['eval/box_accuracy'] <= 1
  assert 0 <= results['eval/box_iou'] <= 1 and 'eval/caption_perplexity' in results
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    record = json.loads(f.readline())
  assert record['eval/box_accuracy'] == results['eval/box_accuracy']
  assert record['eval/aref_tasks'] == results['eval/aref_tasks']
  assert 'eval/box_accuracy' in capsys.readouterr().out

  # The true boxes as the decoding: accuracy 1 on the same tasks.
  monkeypatch.setattr(referring, 'decode_aref', lambda model, p, b: b['box/tokens'])
  oracle = trainer_lib.Trainer(eval_config(box_accuracy=True), None,
                               devices=jax.devices()[:1]).heldout_metrics(params)
  assert oracle['eval/aref_tasks'] == results['eval/aref_tasks']
  assert oracle['eval/box_accuracy'] == 1.0


def test_box_results_without_tasks_report_only_the_count():
  assert trainer_lib.box_results(0, 0.0, 0) == {'eval/aref_tasks': 0}
  assert trainer_lib.box_results(3, 2.0, 4) == {
      'eval/aref_tasks': 4, 'eval/box_accuracy': .75, 'eval/box_iou': .5}
