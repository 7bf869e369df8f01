"""Referring-expression accuracy (LocCa, SigLIP 2): greedy ARef decoding, IoU.

LocCa's ARef task prompts the decoder with [aref_token] + a region's text
and reads the region's box off the 4 location tokens it writes next
(data/boxes.py's format). It is scored as RefCOCO is: the decoder generates
the 4 tokens greedily, each the argmax over the location tokens alone, and
a prediction is correct when its box has IoU >= 0.5 with the true box.

The tasks scored are the ARef places of a batch's box rows (`box/valid`
and `box/tokens` position 0 the aref token); the true box is read off their
target tokens (`box/target`), the predicted one off the generated tokens,
each bin at its centre (as `boxes.dequantise`). A true box whose min and
max coordinates share a bin (with 500 bins, under 1/500 of the image's
side) has no area, so no prediction scores on it.

Decoding needs no cache: the sequences are a few tokens long, so each of
the 4 steps runs the teacher-forced decoder (`TwoTowers.box_logits`) on the
whole row with the tokens generated so far in place of the box. The decoder
is causal, so the step's position reads only the prompt and the tokens
generated before it, and the box rows cross-attend, as in training, to
their own image only (segment ids): a task's prediction depends on nothing
else of the packed batch. Everything here is jnp, so the scores are reduced
on the device inside the caller's jit.
"""

import jax.numpy as jnp

from lit_navit.data import boxes as boxes_lib

IOU_THRESHOLD = 0.5  # RefCOCO's: a box with IoU >= 0.5 is correct.
LOCATIONS = 4        # Location tokens of a box: ymin, xmin, ymax, xmax.


def iou(a, b):
  """Intersection over union of boxes (ymin, xmin, ymax, xmax) [..., 4]; a
  box with max < min is empty, and a pair with no union has 0."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  def area(box):
    return (jnp.maximum(box[..., 2] - box[..., 0], 0)
            * jnp.maximum(box[..., 3] - box[..., 1], 0))
  inter = area(jnp.concatenate([jnp.maximum(a[..., :2], b[..., :2]),
                                jnp.minimum(a[..., 2:], b[..., 2:])], axis=-1))
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def aref_places(batch, fmt: boxes_lib.BoxFormat):
  """bool [G, C]: the caption places that hold an ARef task."""
  return batch['box/valid'] & (batch['box/tokens'][..., 0] == fmt.aref_token)


def first_target(target):
  """int [G, C]: the first target position of each box row (an ARef's
  first location token); 0 in a row without targets."""
  return jnp.argmax(target, axis=-1)


def location_boxes(tokens, first, fmt: boxes_lib.BoxFormat):
  """float32 [G, C, 4]: the box of the 4 location tokens of `tokens`
  [G, C, T] from position `first` [G, C], each bin at its centre."""
  at = first[..., None] + jnp.arange(LOCATIONS)
  bins = jnp.take_along_axis(tokens, at, axis=-1) - fmt.vocab_offset
  return (jnp.clip(bins, 0, fmt.bins - 1).astype(jnp.float32) + 0.5) / fmt.bins


def greedy_aref(logits_fn, batch, fmt: boxes_lib.BoxFormat, pad_id: int):
  """`box/tokens` [G, C, T] with each ARef's 4 location tokens generated
  greedily in place of the true ones (other rows unchanged).

  logits_fn(tokens [G, C, T]) -> the decoder's logits [G, C, T, vocab] of
  those box rows, teacher-forced. Each step takes the argmax over the
  location tokens at the next box position; the true box's positions are
  pad until generated, so nothing of it is read.
  """
  tokens, places = batch['box/tokens'], aref_places(batch, fmt)
  first = first_target(batch['box/target'])
  at = jnp.arange(tokens.shape[-1])
  tokens = jnp.where(places[..., None] & (at >= first[..., None]), pad_id, tokens)
  for step in range(LOCATIONS):
    position = first + step
    logits = jnp.take_along_axis(logits_fn(tokens), position[..., None, None],
                                 axis=2)[..., 0, :]
    locations = logits[..., fmt.vocab_offset:fmt.vocab_offset + fmt.bins]
    token = jnp.argmax(locations, axis=-1) + fmt.vocab_offset
    tokens = jnp.where(places[..., None] & (at == position[..., None]),
                       token[..., None], tokens)
  return tokens


def decode_aref(model, params, batch):
  """The box rows' tokens [G, C, T] with every ARef's box generated greedily
  by `model` (a TwoTowers with box tasks) from its image and prompt."""
  fmt, pad_id = boxes_lib.format_of_model(model.config), model.config.text.pad_id

  def run(module, batch):
    _, image_tokens = module._slot_embeddings(batch, return_tokens=True)  # pylint: disable=protected-access
    return greedy_aref(lambda tokens: module.box_logits(image_tokens, batch, tokens),
                       batch, fmt, pad_id)
  return model.apply({'params': params}, batch, method=run)


def aref_scores(predicted, batch, fmt: boxes_lib.BoxFormat) -> dict:
  """Sums over a batch's ARef tasks of the boxes in `predicted` [G, C, T]
  against the true ones: 'correct' (IoU >= 0.5), 'iou' (summed IoU) and
  'tasks' (their number)."""
  places = aref_places(batch, fmt)
  first = first_target(batch['box/target'])
  overlap = iou(location_boxes(predicted, first, fmt),
                location_boxes(batch['box/tokens'], first, fmt))
  return {'correct': jnp.sum(places & (overlap >= IOU_THRESHOLD)),
          'iou': jnp.sum(jnp.where(places, overlap, 0.0)),
          'tasks': jnp.sum(places)}


def box_scores(model, params, batch) -> dict:
  """`aref_scores` of `model`'s greedy boxes on a batch with box/*."""
  return aref_scores(decode_aref(model, params, batch), batch,
                     boxes_lib.format_of_model(model.config))
