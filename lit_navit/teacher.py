"""The EMA teacher of the self-distillation objectives (lit_navit/distill.py).

With model.distill on, the train state holds

  state['teacher'] = {'params': {'img': ..., 'distill_head': ..., 'patch_head': ...},
                      'center': [K], 'patch_center': [K]}

'params' is an EMA copy of the student's image tower and distillation
head(s) (the same paths, so the same sharding rules shard it), initialised
as a copy of the student; the centers are EMAs of the teacher's batch-mean
logits (DINO centering), starting at zero. Orbax saves and restores it with
the rest of the state. With both objectives off there is no teacher and the
state, and its checkpoints, are as before.

Each step, after the optimizer update: t <- m * t + (1 - m) * s, from step 0
on; from model.distill.start_step on, the teacher also runs forward
(`targets`, no gradient) and the centers move.
"""

import jax
import jax.numpy as jnp

from lit_navit import distill
from lit_navit.models import two_towers

# The student params the teacher mirrors: the image tower and the heads.
TOWERS = ('img', 'distill_head', 'patch_head')


def student_part(params) -> dict:
  """The subtree of the student's params that the teacher mirrors."""
  return {k: params[k] for k in TOWERS if k in params}


def init(params, model_config) -> dict:
  """A teacher equal to the student, its centers zero."""
  prototypes = model_config.distill.head.prototypes
  return {'params': jax.tree.map(jnp.copy, student_part(params)),
          'center': jnp.zeros((prototypes,), jnp.float32),
          'patch_center': jnp.zeros((prototypes,), jnp.float32)}


def shardings(param_shardings, replicated) -> dict:
  """The teacher's shardings: its params' are the student's, by path."""
  return {'params': student_part(param_shardings), 'center': replicated,
          'patch_center': replicated}


def ema(old, new, momentum: float):
  """momentum * old + (1 - momentum) * new, leaf by leaf, in the leaves' dtype."""
  return jax.tree.map(lambda o, n: momentum * o + (1 - momentum) * n, old, new)


def targets(model_config, teacher, batch) -> dict:
  """The teacher's outputs on the batch's rows, for distill.losses: per-slot
  'logits' [B, E, K] and per-token 'patch_logits' [B, L, K] of the heads that
  are on, the centers they are read against, and the batch means of the
  global images' logits that move the centers. No gradient flows back."""
  d = model_config.distill
  distill.require_keys(batch, d)
  params = teacher['params']
  slots, tokens = two_towers.image_tower(model_config).apply(
      {'params': params['img']}, batch['image/patches'], batch['image/yx'],
      batch['image/segment'], batch['image/grid'], return_tokens=True)
  heads = two_towers.distill_heads(model_config)
  out = {'center': teacher['center'], 'patch_center': teacher['patch_center']}
  if d.weight > 0:
    out['logits'] = heads['distill_head'].apply({'params': params['distill_head']}, slots)
    out['mean'] = _mean_where(out['logits'], distill.global_slots(batch))
  if d.masked_weight > 0:
    out['patch_logits'] = heads['patch_head'].apply({'params': params['patch_head']},
                                                    tokens)
    out['patch_mean'] = _mean_where(out['patch_logits'], distill.global_tokens(batch))
  return jax.lax.stop_gradient(out)


def _mean_where(logits, where):
  """Mean over the batch of the logits [..., K] where `where` [...] holds."""
  weights = where.astype(logits.dtype)[..., None]
  return jnp.sum(logits * weights, axis=tuple(range(where.ndim))) / jnp.maximum(
      jnp.sum(weights), 1)


def update(teacher, student_params, distill_config, step_targets=None) -> dict:
  """The teacher after a step: its params an EMA of the updated student's;
  with this step's `targets` (from start_step on), its centers an EMA of the
  teacher's batch means."""
  new = dict(teacher, params=ema(teacher['params'], student_part(student_params),
                                 distill_config.ema_momentum))
  if step_targets is not None:
    for center, mean in (('center', 'mean'), ('patch_center', 'patch_mean')):
      if mean in step_targets:
        new[center] = ema(teacher[center], step_targets[mean],
                          distill_config.center_momentum)
  return new
