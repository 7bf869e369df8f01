"""Resolution sampling that keeps an image's aspect ratio (NaViT, SigLIP 2).

Every function here returns an image's size as a patch grid (rows, cols): the
image is later resized to exactly (rows * p, cols * p) pixels. Grids are at
least 1x1, keep the aspect ratio to within one patch (all but 'square'), and
never hold more than `max_tokens` patches: an image too large for the budget
is scaled down as a whole, never cropped.

Modes:
  'side'    a length is drawn and used as the image's LONGER side, in pixels.
  'area'    a length is drawn and used as sqrt(area), in pixels.
  'fit'     no draw: the largest size whose grid, each side rounded up to a
            whole patch, has at most `max_tokens` patches (SigLIP 2 NaFlex).
            Small images are scaled up, so every image costs ~max_tokens.
  'native'  no draw: the image's own size, each side rounded up to a whole
            patch, when that grid fits `max_tokens`; else exactly 'fit'.
            That is NaFlex's grid at scale min(1, s_fit): never scaled up
            beyond the rounding, so a small image costs few tokens.
  'square'  no draw: the largest square grid within `max_tokens`, whatever
            the image's shape (a plain ViT's fixed input, aspect not kept):
            the padded baseline that packing is measured against.

'fit', 'native' and 'square' are the evaluation modes (EVAL_MODES); in eval
the sampling modes fall back to 'fit'.

The length is drawn 'uniform' on [min, max], or 'truncated_normal': x from
N(mean, std) truncated to [-1, 1], mapped linearly onto [min, max] (NaViT's
best was N_t(-0.5, 1), which favours small images).
"""

import math
import statistics

import numpy as np

MODES = ('side', 'area', 'fit', 'native', 'square')
EVAL_MODES = ('fit', 'native', 'square')  # No draw: a function of the image alone.
DISTRIBUTIONS = ('uniform', 'truncated_normal')

_STANDARD_NORMAL = statistics.NormalDist()
_TINY = np.nextafter(0.0, 1.0)


def truncated_normal(rng: np.random.Generator, mean: float, std: float,
                     low: float, high: float) -> float:
  """One draw from N(mean, std) restricted to [low, high] (inverse CDF)."""
  if std <= 0:
    return float(np.clip(mean, low, high))
  lo = _STANDARD_NORMAL.cdf((low - mean) / std)
  hi = _STANDARD_NORMAL.cdf((high - mean) / std)
  # Clipping keeps inv_cdf defined when the window lies far in a tail.
  u = float(np.clip(rng.uniform(lo, hi), _TINY, 1.0 - 1e-16))
  return float(np.clip(mean + std * _STANDARD_NORMAL.inv_cdf(u), low, high))


def sample_length(rng: np.random.Generator, dist: str, low: float,
                  high: float, mean: float = 0.0, std: float = 1.0) -> float:
  """Draws a length in pixels on [low, high] from `dist`."""
  if low <= 0 or high < low:
    raise ValueError(f'resolution: need 0 < min <= max, got min={low}, max={high}')
  if dist == 'uniform':
    return float(rng.uniform(low, high))
  if dist == 'truncated_normal':
    x = truncated_normal(rng, mean, std, -1.0, 1.0)
    return low + (x + 1.0) / 2.0 * (high - low)
  raise ValueError(f'resolution.dist must be one of {DISTRIBUTIONS}, got {dist!r}')


def _short_grid(long_grid, long_px: int, short_px: int):
  """Patches along the shorter side for `long_grid` along the longer side.

  Rounds half up in integers so the ratio is exact; at least 1.
  """
  return np.maximum(1, (2 * long_grid * short_px + long_px) // (2 * long_px))


def grid_for_long_side(height: int, width: int, long_side: float,
                       patch_size: int, max_tokens: int) -> tuple[int, int]:
  """Grid whose longer side is about `long_side` pixels, shrunk to fit the budget."""
  if max_tokens < 1:
    raise ValueError(f'resolution.max_tokens must be >= 1, got {max_tokens}')
  long_px, short_px = max(height, width), min(height, width)
  # At least one patch across, so never more than max_tokens along.
  wanted = min(max_tokens, max(1, int(round(long_side / patch_size))))
  # The largest long-side grid (<= wanted) whose whole grid fits the budget.
  candidates = np.arange(wanted, 0, -1)
  tokens = candidates * _short_grid(candidates, long_px, short_px)
  long_grid = int(candidates[np.argmax(tokens <= max_tokens)])
  short_grid = int(_short_grid(long_grid, long_px, short_px))
  return (long_grid, short_grid) if height >= width else (short_grid, long_grid)


def _largest_fitting(along: int, across: int, max_tokens: int) -> int:
  """Largest k with k * ceil(k * across / along) <= max_tokens, or 0."""
  k = np.arange(1, max_tokens + 1)
  fits = k * (-(-k * across // along)) <= max_tokens
  return int(k[fits].max(initial=0))


def grid_for_budget(height: int, width: int,
                    max_tokens: int) -> tuple[int, int]:
  """SigLIP 2 NaFlex sizing: the largest scale s whose grid has <= max_tokens.

  The grid at scale s is (ceil(height * s / p), ceil(width * s / p)). That
  count only jumps just after s makes a side a whole number of patches, so
  the largest fitting s is k * p / height or k * p / width for some k, and
  the grid does not depend on p (only the pixels per patch do).
  """
  if max_tokens < 1:
    raise ValueError(f'resolution.max_tokens must be >= 1, got {max_tokens}')
  # One of the two is >= 1: k = 1 fits along the longer side.
  k_rows = _largest_fitting(height, width, max_tokens)
  k_cols = _largest_fitting(width, height, max_tokens)
  if k_rows * width >= k_cols * height:  # k_rows / height >= k_cols / width
    return k_rows, -(-k_rows * width // height)
  return -(-k_cols * height // width), k_cols


def grid_for_native(height: int, width: int, patch_size: int,
                    max_tokens: int) -> tuple[int, int]:
  """The native grid (each side rounded up to a whole patch) if it has at
  most `max_tokens` patches, else `grid_for_budget`.

  The native grid is NaFlex's grid at scale 1; a grid that does not fit
  means the fitting scale is below 1, so the fallback only ever shrinks.
  """
  if max_tokens < 1:
    raise ValueError(f'resolution.max_tokens must be >= 1, got {max_tokens}')
  rows, cols = -(-height // patch_size), -(-width // patch_size)
  if rows * cols <= max_tokens:
    return rows, cols
  return grid_for_budget(height, width, max_tokens)


def grid_for_square(max_tokens: int) -> tuple[int, int]:
  """The largest g x g grid with at most `max_tokens` patches."""
  if max_tokens < 1:
    raise ValueError(f'resolution.max_tokens must be >= 1, got {max_tokens}')
  side = math.isqrt(max_tokens)
  return side, side


def sample_grid(rng: np.random.Generator, height: int, width: int,
                patch_size: int, config, max_tokens: int) -> tuple[int, int]:
  """The grid for one image under the `resolution` config.

  Args:
    rng: keyed generator for this draw (unused in EVAL_MODES).
    height, width: the decoded image's size in pixels.
    patch_size: p.
    config: has mode, dist, min, max, mean, std (see module docstring).
    max_tokens: hard budget in patches (the row length, or less).
  """
  if height < 1 or width < 1:
    raise ValueError(f'image size must be positive, got {height}x{width}')
  if config.mode == 'fit':
    return grid_for_budget(height, width, max_tokens)
  if config.mode == 'native':
    return grid_for_native(height, width, patch_size, max_tokens)
  if config.mode == 'square':
    return grid_for_square(max_tokens)
  length = sample_length(rng, config.dist, config.min, config.max,
                         config.mean, config.std)
  if config.mode == 'side':
    long_side = length
  elif config.mode == 'area':
    long_side = length * math.sqrt(max(height, width) / min(height, width))
  else:
    raise ValueError(f'resolution.mode must be one of {MODES}, got {config.mode!r}')
  return grid_for_long_side(height, width, long_side, patch_size, max_tokens)
