"""Local crops (SILC, SigLIP 2 self-distillation): small views of a training image.

Each training image gets `input.local_crops.count` crops, drawn as DINO's and
SILC's RandomResizedCrop draws them: a box covering a fraction of the
image's area uniform in [min_scale, max_scale], with an aspect ratio (width
/ height) log-uniform in [3/4, 4/3], each side clamped to the image (rather
than redrawn), at a uniform position. The box is cut from the decoded image,
before any resize, so a crop keeps the source's detail, then sized like an
evaluation image: the largest grid of at most `max_tokens` patches that
keeps the box's aspect ratio (`resolution.grid_for_budget`, SigLIP 2's
NaFlex sizing), so every crop costs about `max_tokens` tokens.

Every box is keyed by (seed, example index, epoch, crop number), so a
restored pipeline, and any worker thread or process, cuts the same crops.

In a batch a parent and its crops are one packing unit (`batch.py`:
`image/parent`): one row, the parent's slot first, its crops in the slots
that follow. Crops have no caption, are never token-dropped (they are
already small, and the teacher's targets are per view), and never masked.
"""

import dataclasses
import math

import numpy as np

from lit_navit.data import resolution

ASPECT_RATIOS = (3 / 4, 4 / 3)  # width / height, log-uniform between.
_CROP_TAG = 0x6c63


@dataclasses.dataclass(frozen=True)
class CropConfig:
  """`input.local_crops` as plain values (it crosses to worker processes)."""
  count: int
  min_scale: float
  max_scale: float
  max_tokens: int


def from_config(config) -> CropConfig | None:
  """The `input.local_crops` config as a CropConfig; None when off (count 0)."""
  if config.count <= 0:
    return None
  return CropConfig(int(config.count), float(config.min_scale),
                    float(config.max_scale), int(config.max_tokens))


def crop_box(rng: np.random.Generator, height: int, width: int,
             min_scale: float, max_scale: float) -> tuple[int, int, int, int]:
  """(top, left, box height, box width) of one crop of a height x width image."""
  area = height * width * rng.uniform(min_scale, max_scale)
  ratio = math.exp(rng.uniform(*np.log(ASPECT_RATIOS)))
  box_width = int(np.clip(round(math.sqrt(area * ratio)), 1, width))
  box_height = int(np.clip(round(math.sqrt(area / ratio)), 1, height))
  top = int(rng.integers(0, height - box_height + 1))
  left = int(rng.integers(0, width - box_width + 1))
  return top, left, box_height, box_width


def crop_boxes(config: CropConfig, *, seed: int, index: int, epoch: int,
               height: int, width: int) -> list[tuple[int, int, int, int]]:
  """The boxes of example `index`'s crops in `epoch`, crop 0 first."""
  return [crop_box(np.random.default_rng([seed, _CROP_TAG, index, epoch, n]),
                   height, width, config.min_scale, config.max_scale)
          for n in range(config.count)]


def cut(image: np.ndarray, box) -> np.ndarray:
  """The box's pixels of an [H, W, 3] image, as a copy (not a view that
  would keep the whole decoded image alive)."""
  top, left, box_height, box_width = box
  return np.ascontiguousarray(image[top:top + box_height, left:left + box_width])


def crop_grid(box, max_tokens: int) -> tuple[int, int]:
  """The crop's patch grid: its aspect ratio, at most `max_tokens` patches."""
  _, _, box_height, box_width = box
  return resolution.grid_for_budget(box_height, box_width, max_tokens)
