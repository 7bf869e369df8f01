"""Continuous token dropping (NaViT): each image drops its own fraction of patches.

The rate is drawn per image, before packing, so the packer sees the number of
tokens each image will really take. Kinds of rate (`token_drop.kind`):

  'none'        nothing is dropped.
  'constant'    every image drops `rate`.
  'beta'        rate ~ Beta(a, b) with mean `rate` and variance
                0.3 * rate * (1 - rate) (NaViT's choice).
  'resolution'  rate ~ N(mean, `resolution_sd`) truncated to [0, 1], whose mean
                grows linearly with the image's token count, from `rate_min`
                at 1 token to `rate_max` at a full row (`max_tokens`).

An optional linear schedule scales the configured rates by a factor going
from 1 at step 0 to `schedule_end_factor` at step `schedule_steps` (0 turns
it off), then staying there. At least one token is always kept; kept
patches keep their coordinates and their row-major order.

Every draw is keyed by (seed, example index, step), so any batch can be
recomputed.
"""

import numpy as np

from lit_navit.data import patches as patches_lib
from lit_navit.data import resolution

KINDS = ('none', 'constant', 'beta', 'resolution')
# NaViT's Beta rates: variance is this fraction of the largest possible one.
BETA_VARIANCE_FACTOR = 0.3
_RATE_TAG = 0x7261
_WHICH_TAG = 0x6b70


def schedule_factor(config, step: int) -> float:
  """The multiplier on the configured rates at `step`."""
  if config.schedule_steps <= 0:
    return 1.0
  progress = min(1.0, step / config.schedule_steps)
  return 1.0 + (config.schedule_end_factor - 1.0) * progress


def beta_parameters(mean: float) -> tuple[float, float]:
  """(a, b) of the Beta with this mean and variance 0.3 * mean * (1 - mean).

  The Beta's variance is mean * (1 - mean) / (a + b + 1), so a + b is fixed
  at 1 / 0.3 - 1 and the mean splits it.
  """
  concentration = 1.0 / BETA_VARIANCE_FACTOR - 1.0
  return mean * concentration, (1.0 - mean) * concentration


def drop_rate(config, *, seed: int, index: int, step: int, num_tokens: int,
              max_tokens: int) -> float:
  """The drop rate of example `index` at `step`, in [0, 1].

  Args:
    config: the `token_drop` config (see module docstring).
    seed, index, step: the key of the draw.
    num_tokens: the image's patch count before dropping.
    max_tokens: the largest possible patch count (the row length).
  """
  kind = config.kind
  if kind == 'none':
    return 0.0
  factor = schedule_factor(config, step)
  rng = np.random.default_rng([seed, _RATE_TAG, index, step])
  if kind == 'constant':
    rate = config.rate * factor
  elif kind == 'beta':
    mean = float(np.clip(config.rate * factor, 0.0, 1.0))
    rate = mean if mean in (0.0, 1.0) else rng.beta(*beta_parameters(mean))
  elif kind == 'resolution':
    span = max(1, max_tokens - 1)
    position = min(1.0, (num_tokens - 1) / span)
    mean = config.rate_min + (config.rate_max - config.rate_min) * position
    rate = resolution.truncated_normal(rng, mean * factor, config.resolution_sd,
                                       0.0, 1.0)
  else:
    raise ValueError(f'token_drop.kind must be one of {KINDS}, got {kind!r}')
  return float(np.clip(rate, 0.0, 1.0))


def kept_count(num_tokens: int, rate: float) -> int:
  """Tokens kept out of `num_tokens` at `rate`; at least one."""
  return int(np.clip(np.rint((1.0 - rate) * num_tokens), 1, num_tokens))


def drop_patches(patches: patches_lib.Patches, keep: int, *, seed: int,
                 index: int, step: int) -> patches_lib.Patches:
  """Keeps a random `keep` of the patches, in their original order."""
  n = len(patches)
  if not 1 <= keep <= n:
    raise ValueError(f'keep must be in 1..{n}, got {keep}')
  if keep == n:
    return patches
  rng = np.random.default_rng([seed, _WHICH_TAG, index, step])
  chosen = np.sort(rng.choice(n, size=keep, replace=False))
  return patches_lib.Patches(patches.pixels[chosen], patches.yx[chosen],
                             patches.grid)
