"""Per-image token masks for masked prediction (TIPS, SigLIP 2).

Of each global image's n tokens in a batch (after token dropping), the
student's masked-prediction pass replaces `masked_count(n, ratio)` with the
mask token: round(ratio * n), half up, but at least one and at most n - 1
when n > 1 (something to predict and something to see), and none when
n == 1. The masked tokens are drawn uniformly at random among the image's
tokens (random masking, as TIPS; not BEiT's block-wise masking), keyed by
(seed, example index, epoch): the same image in the same epoch is masked
the same way, on any worker and after a restore.

Crops and padding are never masked (`batch.py`: `image/masked`).
"""

import math

import numpy as np

_MASK_TAG = 0x6d6b


def masked_count(num_tokens: int, ratio: float) -> int:
  """How many of an image's `num_tokens` tokens are masked at `ratio`."""
  if ratio <= 0 or num_tokens <= 1:
    return 0
  return min(max(1, math.floor(ratio * num_tokens + 0.5)), num_tokens - 1)


def token_mask(num_tokens: int, ratio: float, *, seed: int, index: int,
               epoch: int) -> np.ndarray:
  """bool [num_tokens]: True for the tokens of example `index` masked in `epoch`."""
  mask = np.zeros(num_tokens, np.bool_)
  count = masked_count(num_tokens, ratio)
  if count:
    rng = np.random.default_rng([seed, _MASK_TAG, index, epoch])
    mask[rng.choice(num_tokens, size=count, replace=False)] = True
  return mask
