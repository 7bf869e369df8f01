"""SILC self-distillation and TIPS masked prediction on packed rows: the losses.

Both objectives read the EMA teacher's outputs on the same packed rows as
the student (lit_navit/teacher.py `targets`), so slots and tokens line up
one to one, and nothing crosses between the images of a row: the towers
attend within an image, and every term below reads one slot's or one
token's own numbers.

  self-distillation  a local crop in slot k of row b (`image/parent`[b, k] =
                     p > 0, batch.py) is matched to its parent, slot p of the
                     same row: CE between the teacher's centred, sharpened
                     softmax of the parent's pooled feature and the student's
                     softmax of the crop's pooled feature (DINO heads),
                     averaged over the crops of the batch. The student's crop
                     features are its main forward's per-slot embeddings.
  masked prediction  a second student pass with the tokens of `image/masked`
                     replaced by the mask token (navit.py); at each masked
                     token, CE between the teacher's centred, sharpened
                     softmax of its unmasked patch feature and the student's
                     (patch heads), averaged over the masked tokens.

The averages are over the whole (sharded) batch: under jit a sum over a
sharded axis is global, so every device shard gives the one-device result.
"""

import jax
import jax.numpy as jnp

from lit_navit.models import two_towers


def teacher_distribution(logits, center, temperature):
  """The teacher's centred, sharpened softmax over the prototypes."""
  return jax.nn.softmax((logits - center) / temperature, axis=-1)


def _cross_entropy(targets, student_logits, temperature):
  return -jnp.sum(targets * jax.nn.log_softmax(student_logits / temperature, axis=-1),
                  axis=-1)


def crop_terms(student_logits, teacher_logits, parent, center, distill_config):
  """Each crop's CE against its own parent's teacher distribution.

  student_logits, teacher_logits [B, E, K] per slot; parent int [B, E]
  (0: not a crop). Returns [B, E], zero for every slot that is not a crop.
  """
  d = distill_config
  targets = teacher_distribution(teacher_logits, center, d.teacher_temp)
  parent = jnp.asarray(parent)
  of_parent = jnp.take_along_axis(targets, jnp.maximum(parent - 1, 0)[..., None],
                                  axis=1)
  terms = _cross_entropy(of_parent, student_logits, d.student_temp)
  return jnp.where(parent > 0, terms, 0.0)


def masked_terms(student_logits, teacher_logits, masked, center, distill_config):
  """Each masked token's CE against the teacher's distribution at that token.

  student_logits (from the masked pass), teacher_logits (unmasked) [B, L, K];
  masked bool [B, L]. Returns [B, L], zero for every unmasked token.
  """
  d = distill_config
  targets = teacher_distribution(teacher_logits, center, d.teacher_temp)
  terms = _cross_entropy(targets, student_logits, d.student_temp)
  return jnp.where(masked, terms, 0.0)


def mean_over(terms, where):
  """Mean of `terms` where `where` holds, over the whole batch (0 if none)."""
  return jnp.sum(terms) / jnp.maximum(jnp.sum(where), 1)


def global_slots(batch):
  """bool [B, E]: the slots that hold a global image (not a crop, not empty)."""
  valid = batch['valid']
  return valid & (batch['image/parent'] == 0) if 'image/parent' in batch else valid


def global_tokens(batch):
  """bool [B, L]: the tokens of global images (not crops, not padding)."""
  segment = batch['image/segment']
  real = segment != 0
  if 'image/parent' not in batch:
    return real
  rows = jnp.arange(segment.shape[0])[:, None]
  parent = jnp.asarray(batch['image/parent'])
  return real & (parent[rows, jnp.maximum(segment - 1, 0)] == 0)


def require_keys(batch, distill_config) -> None:
  """Raises ValueError, naming the config keys, when the batch lacks the
  inputs an objective that is on needs."""
  needs = [('weight', 'image/parent', 'input.local_crops.count > 0'),
           ('masked_weight', 'image/masked', 'input.mask_ratio > 0')]
  for key, batch_key, how in needs:
    if distill_config[key] > 0 and batch_key not in batch:
      raise ValueError(f'config key model.distill.{key}={distill_config[key]} needs '
                       f'{batch_key!r} in the batch ({how})')


def terms(model_config, params, batch, slots, targets) -> dict:
  """Per-crop 'distill' [B, E] and per-masked-token 'masked' [B, L] CE terms of
  the objectives that are on (zero elsewhere).

  `slots` [B, E, D] are the student's per-slot embeddings from its main
  forward (TwoTowers extras['slots']); `targets` the teacher's outputs
  (teacher.targets). The student's heads and, for masked prediction, its
  second image-tower pass run here on `params`.
  """
  d = model_config.distill
  require_keys(batch, d)
  heads = two_towers.distill_heads(model_config)
  out = {}
  if d.weight > 0:
    logits = heads['distill_head'].apply({'params': params['distill_head']}, slots)
    out['distill'] = crop_terms(logits, targets['logits'], batch['image/parent'],
                                targets['center'], d)
  if d.masked_weight > 0:
    _, tokens = two_towers.image_tower(model_config).apply(
        {'params': params['img']}, batch['image/patches'], batch['image/yx'],
        batch['image/segment'], batch['image/grid'], return_tokens=True,
        masked=batch['image/masked'])
    logits = heads['patch_head'].apply({'params': params['patch_head']}, tokens)
    out['masked'] = masked_terms(logits, targets['patch_logits'], batch['image/masked'],
                                 targets['patch_center'], d)
  return out


def losses(model_config, params, batch, slots, targets):
  """(weighted sum of the losses that are on, their metrics 'distill_loss'
  (mean over the crops) and 'masked_loss' (mean over the masked tokens))."""
  d = model_config.distill
  by_kind = terms(model_config, params, batch, slots, targets)
  total, metrics = 0.0, {}
  if 'distill' in by_kind:
    metrics['distill_loss'] = mean_over(by_kind['distill'], batch['image/parent'] > 0)
    total += d.weight * metrics['distill_loss']
  if 'masked' in by_kind:
    metrics['masked_loss'] = mean_over(by_kind['masked'], batch['image/masked'])
    total += d.masked_weight * metrics['masked_loss']
  return total, metrics
