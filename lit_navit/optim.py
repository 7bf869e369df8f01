"""The optimizer: an optax chain built from the config, big_vision style.

Config keys (`default_config` gives them all):

  optax_name      'adam' | 'adamw' | 'adafactor'. Weight decay is always the
                  decoupled `wd` below, so 'adam' with wd > 0 is AdamW and
                  'adamw' is the same transform under its familiar name.
  optax           kwargs of the scaler: optax.scale_by_adam (b1, b2, eps...;
                  b2 = 0.95 helps large batches) or optax.adafactor.
  lr              base learning rate.
  wd              decoupled weight decay, scaled by the learning rate.
  wd_mults        [(regex, mult)]: decay of a parameter is wd * mult; those no
                  rule matches are not decayed (default: kernels only).
  lr_mults        [(regex, mult)]: per-parameter learning-rate multipliers
                  (unmatched: 1).
  grad_clip_norm  clip the trainable gradients to this global norm (None: off).
  schedule        [(regex, schedule dict or None)]; every parameter must match
                  a rule. None freezes the group: it gets no update and holds
                  no optimizer state. A single schedule dict applies to all.

Rules are regexes over '/'-joined parameter paths, matched in full, first
match wins. A trainable parameter p of schedule group g moves by

  -lr * sched_g(step) * lr_mult(p) * (scaled(clipped g) + wd * wd_mult(p) * p)

A schedule dict holds `decay_type` ('cosine' | 'rsqrt' | 'linear' |
'constant') and the keyword arguments of `make_schedule`.

LiT (locked-image tuning) is a two-line change of the schedule:

  config.schedule = [('img/.*', None),
                     ('.*', dict(decay_type='cosine', warmup_steps=1000))]

and the same with 'txt/.*' locks the text tower instead.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lit_navit import rules

DECAY_TYPES = ('cosine', 'rsqrt', 'linear', 'constant')


def default_config() -> ml_collections.ConfigDict:
  """Adam(b2=0.95), lr 1e-3, decay of kernels, clipping, cosine with warmup."""
  config = ml_collections.ConfigDict()
  config.optax_name = 'adam'
  config.optax = dict(b1=0.9, b2=0.95)
  config.lr = 1e-3
  config.wd = 1e-4
  config.wd_mults = [('.*/kernel$', 1.0)]
  config.lr_mults = []
  config.grad_clip_norm = 1.0
  config.schedule = [('.*', dict(decay_type='cosine', warmup_percent=0.05))]
  return config


def _warmup_or_cooldown_steps(steps, percent, total_steps, name):
  if percent is None:
    return steps
  if steps:
    raise ValueError(f'Schedule sets both {name}_steps and {name}_percent.')
  return int(percent * total_steps)


def make_schedule(total_steps: int, *, decay_type: str, warmup_steps: int = 0,
                  warmup_percent: float | None = None, cooldown_steps: int = 0,
                  cooldown_percent: float | None = None,
                  timescale: float = 10_000, min_lr: float = 0.0,
                  linear_end: float = 0.0):
  """step -> multiplier of the base learning rate (1 at the end of warmup).

  Warmup ramps linearly from 0 to 1 over `warmup_steps` (or the fraction
  `warmup_percent` of `total_steps`, e.g. 0.05). Then, with progress p running
  from 0 to 1 between the end of warmup and `total_steps`:

    cosine    min_lr + (1 - min_lr) * (1 + cos(pi p)) / 2   (min_lr: a fraction)
    linear    1 + (linear_end - 1) * p
    rsqrt     1 / sqrt(1 + (step - warmup_steps) / timescale)
    constant  1

  `cooldown_steps` (or `cooldown_percent`), meant for rsqrt, then ramps the
  result linearly down to 0 at `total_steps`.
  """
  if decay_type not in DECAY_TYPES:
    raise ValueError(f'Unknown schedule decay_type {decay_type!r}: '
                     f'expected one of {DECAY_TYPES}.')
  warmup = _warmup_or_cooldown_steps(
      warmup_steps, warmup_percent, total_steps, 'warmup')
  cooldown = _warmup_or_cooldown_steps(
      cooldown_steps, cooldown_percent, total_steps, 'cooldown')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decay_steps = max(total_steps - warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if decay_type == 'cosine':
      lr = min_lr + (1 - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif decay_type == 'linear':
      lr = 1 + (linear_end - 1) * progress
    elif decay_type == 'rsqrt':
      lr = jax.lax.rsqrt(1 + jnp.maximum(step - warmup, 0.0) / timescale)
    else:
      lr = jnp.ones_like(step)
    if warmup:
      lr = lr * jnp.minimum(1.0, step / warmup)
    if cooldown:
      lr = lr * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
    return lr

  return schedule


def schedule_rules(schedule):
  """config.schedule as a list of (regex, schedule dict or None)."""
  if isinstance(schedule, (dict, ml_collections.ConfigDict)):
    return [('.*', schedule)]
  return list(schedule)


def _scaler(name, kwargs):
  """The gradient scaler named by config.optax_name (an ascent direction)."""
  if name in ('adam', 'adamw'):
    return optax.scale_by_adam(**kwargs)
  if name == 'adafactor':
    # optax.adafactor ends by flipping the sign for descent; the schedule does.
    return optax.chain(optax.adafactor(learning_rate=None, **kwargs),
                       optax.scale(-1.0))
  raise ValueError(f'Unknown config.optax_name {name!r}: '
                   "expected 'adam', 'adamw' or 'adafactor'.")


def _per_param(fn, factors):
  """Stateless transform: update = fn(update, param, factor), leaf by leaf."""
  return optax.stateless(
      lambda updates, params: jax.tree.map(fn, updates, params, factors))


def make_optimizer(config, params, total_steps: int):
  """Builds the optax chain for `params` (arrays or jax.eval_shape output).

  Returns (tx, schedule_fns): schedule_fns maps each trainable schedule rule's
  regex to step -> learning rate (lr times the schedule, before lr_mults),
  for logging. Raises ValueError naming the parameters no schedule rule
  matches.
  """
  schedules = schedule_rules(config.schedule)
  group = rules.match_rules(
      params, [(pattern, i) for i, (pattern, _) in enumerate(schedules)],
      'config.schedule')
  trainable = jax.tree.map(lambda i: schedules[i][1] is not None, group)
  wd_mult = rules.match_rules(
      params, [*config.wd_mults, ('.*', 0.0)], 'config.wd_mults')
  lr_mult = rules.match_rules(
      params, [*config.lr_mults, ('.*', 1.0)], 'config.lr_mults')

  lr, wd = config.lr, config.wd
  schedule_fns, group_txs = {}, {}
  for i, (pattern, schedule) in enumerate(schedules):
    if schedule is None:
      group_txs[i] = optax.set_to_zero()
      continue
    fn = make_schedule(total_steps, **schedule)
    schedule_fns[pattern] = lambda step, fn=fn: lr * fn(step)
    group_txs[i] = optax.scale_by_schedule(lambda step, fn=fn: -lr * fn(step))

  # Clipping and the stateful scaler see trainable parameters only, so frozen
  # gradients neither count towards the norm nor get optimizer state; the
  # frozen groups' updates are zeroed at the end.
  scale = _scaler(config.optax_name, dict(config.optax))
  if config.grad_clip_norm:
    scale = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), scale)
  tx = optax.chain(
      optax.masked(scale, trainable),
      _per_param(lambda u, p, m: u + wd * m * p if wd * m else u, wd_mult),
      _per_param(lambda u, _, m: u * m if m != 1 else u, lr_mult),
      optax.multi_transform(group_txs, group),
  )
  return tx, schedule_fns
