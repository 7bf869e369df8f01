"""A synthetic image-text source: coloured shapes on textured backgrounds.

It powers the CPU demo and the tests. Each image shows one shape of one
colour, size and position, at a random size and aspect ratio; its caption
names them, and its one box (`boxes.Region`: the shape's centre plus or
minus its radius, normalised to the image) is named by colour and shape,
e.g. 'red circle', for LocCa's box tasks. Some (shape, colour) pairs are
never shown in the 'train' split but every shape and every colour is, so
zero-shot classification on the 'heldout' split measures whether a model
composes what it learned.

Every example is a pure function of (seed, split, index).
"""

import io
import math
import re

import numpy as np
from PIL import Image
from PIL import ImageDraw

from lit_navit.data import boxes
from lit_navit.data import sources

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'hexagon',
          'diamond')
# Saturated colours far apart in hue, so they stand out on muted backgrounds.
COLOUR_RGB = {
    'red': (215, 25, 30),
    'orange': (245, 130, 10),
    'yellow': (245, 215, 0),
    'green': (30, 160, 50),
    'cyan': (0, 190, 205),
    'blue': (25, 65, 215),
    'purple': (125, 40, 170),
    'pink': (240, 60, 185),
}
COLOURS = tuple(COLOUR_RGB)
SIZES = ('small', 'large')
POSITIONS = ('left', 'right', 'top', 'bottom', 'centre')
SPLITS = ('train', 'heldout', 'all')
IMAGE_FORMATS = ('jpeg', 'png', 'webp')

# 12 of the 64 pairs (19%): each shape and each colour is held out at most
# twice, so every one of them still appears in 'train' with 6 or 7 partners.
HELD_OUT = frozenset({
    ('circle', 'orange'), ('square', 'yellow'), ('triangle', 'green'),
    ('star', 'cyan'), ('cross', 'blue'), ('ring', 'purple'),
    ('hexagon', 'pink'), ('diamond', 'red'),
    ('circle', 'cyan'), ('square', 'blue'), ('triangle', 'purple'),
    ('star', 'pink'),
})

# Object diameter as a fraction of the image's short side.
_SIZE_RANGE = {'small': (0.30, 0.42), 'large': (0.55, 0.70)}
# Object centre as a fraction of (width, height), before jitter and clamping.
_POSITION_CENTRE = {'left': (0.25, 0.5), 'right': (0.75, 0.5),
                    'top': (0.5, 0.25), 'bottom': (0.5, 0.75),
                    'centre': (0.5, 0.5)}
_WHERE = {'left': 'on the left', 'right': 'on the right', 'top': 'at the top',
          'bottom': 'at the bottom', 'centre': 'in the centre'}
_TEMPLATES = (
    'a {size} {colour} {shape} {where}',
    'a photo of a {size} {colour} {shape} {where}',
    'a {colour} {shape}',
    'a {colour} {shape} {where}',
    'a {size} {colour} {shape}',
    'there is a {colour} {shape} {where}',
    'a drawing of a {size} {colour} {shape}',
    '{colour} {shape}, {size}, {where}',
)
_MAX_TILT_DEGREES = 15  # Squares stay far from diamonds (45 degrees).


def class_names() -> list[str]:
  """Every shape x colour pair as a class name, e.g. 'red circle'.

  Class id = shape index * len(COLOURS) + colour index.
  """
  return [f'{colour} {shape}' for shape in SHAPES for colour in COLOURS]


def class_id(shape: str, colour: str) -> int:
  return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def held_out_class_ids() -> list[int]:
  """Class ids of the HELD_OUT pairs, ascending."""
  return sorted(class_id(shape, colour) for shape, colour in HELD_OUT)


def _pairs(split: str) -> list[tuple[str, str]]:
  every = [(shape, colour) for shape in SHAPES for colour in COLOURS]
  if split == 'train':
    return [pair for pair in every if pair not in HELD_OUT]
  if split == 'heldout':
    return [pair for pair in every if pair in HELD_OUT]
  return every


class SyntheticSource:
  """`size` examples of coloured shapes; a `sources.Source`.

  Args:
    size: number of examples.
    seed: the data seed; each example is drawn from (seed, split, index).
    split: 'train' (no HELD_OUT pair), 'heldout' (only HELD_OUT pairs) or
      'all'.
    image_format: 'jpeg', 'png' or 'webp'.
    min_side, max_side: bounds on image width and height in pixels.
    max_aspect: the longer side is at most this many times the shorter.
    object_scale: multiplies the object's diameter (30-70% of the short
      side at 1). Below 1 objects get small, so telling shapes apart needs
      pixels: a task where resolution matters (experiments/).
  """

  def __init__(self, size: int, seed: int = 0, split: str = 'train',
               image_format: str = 'jpeg', min_side: int = 32,
               max_side: int = 512, max_aspect: float = 4.0,
               object_scale: float = 1.0):
    if split not in SPLITS:
      raise ValueError(f'unknown synthetic split {split!r}; expected one of {SPLITS}')
    if image_format not in IMAGE_FORMATS:
      raise ValueError(f'unknown image_format {image_format!r}; expected one '
                       f'of {IMAGE_FORMATS}')
    if size < 0:
      raise ValueError(f'size must be >= 0, got {size}')
    if not 1 <= min_side <= max_side:
      raise ValueError(f'need 1 <= min_side <= max_side, got min_side='
                       f'{min_side}, max_side={max_side}')
    if max_aspect < 1:
      raise ValueError(f'max_aspect must be >= 1, got {max_aspect}')
    if not 0 < object_scale <= 1 / _SIZE_RANGE['large'][1]:
      raise ValueError('object_scale must be in (0, '
                       f"{1 / _SIZE_RANGE['large'][1]:.2f}] so objects fit "
                       f'the image, got {object_scale}')
    self.size, self.seed, self.split = size, seed, split
    self.image_format = image_format
    self.min_side, self.max_side, self.max_aspect = min_side, max_side, max_aspect
    self.object_scale = object_scale
    self._pairs = _pairs(split)
    self._split_id = SPLITS.index(split)

  def __len__(self) -> int:
    return self.size

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self._split_id, index])

  def attributes(self, index: int) -> dict:
    """What example `index` shows: shape, colour, size, position, class_id,
    caption, image width/height, its box region, and how object and
    background are drawn."""
    index = sources.check_index(index, self.size)
    return self._draw_attributes(self._rng(index))

  def _draw_attributes(self, rng: np.random.Generator) -> dict:
    """Draws every attribute; rendering then continues with the same rng."""
    shape, colour = self._pairs[rng.integers(len(self._pairs))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    width, height = self._draw_image_size(rng)
    short = min(width, height)
    radius = short * self.object_scale * rng.uniform(*_SIZE_RANGE[size]) / 2
    fx, fy = _POSITION_CENTRE[position] + rng.uniform(-0.05, 0.05, 2)
    centre = (float(np.clip(fx * width, radius, width - radius)),
              float(np.clip(fy * height, radius, height - radius)))
    rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-15, 16, 3), 0, 255)
    # Muted background: a low-saturation grey, a gentle gradient and noise.
    grey = rng.uniform(80, 180)
    start = np.clip(grey + rng.uniform(-20, 20, 3), 0, 255)
    end = np.clip(start + rng.uniform(-40, 40, 3), 0, 255)
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    caption = template.format(size=size, colour=colour, shape=shape,
                              where=_WHERE[position])
    return {
        'shape': shape,
        'colour': colour,
        'size': size,
        'position': position,
        'class_id': class_id(shape, colour),
        'caption': re.sub(r'\ba ([aeiou])', r'an \1', caption),
        'width': width,
        'height': height,
        'centre': centre,
        'radius': float(radius),
        'region': _region(centre, radius, width, height, f'{colour} {shape}'),
        'tilt': float(rng.uniform(-_MAX_TILT_DEGREES, _MAX_TILT_DEGREES)),
        'rgb': tuple(int(c) for c in rgb),
        'background': {
            'start_rgb': tuple(float(c) for c in start),
            'end_rgb': tuple(float(c) for c in end),
            'gradient_degrees': float(rng.uniform(0, 360)),
            'noise_std': float(rng.uniform(3, 12)),
        },
    }

  def _draw_image_size(self, rng: np.random.Generator) -> tuple[int, int]:
    """Width and height within [min_side, max_side] and max_aspect."""
    max_ratio = min(self.max_aspect, self.max_side / self.min_side)
    ratio = math.exp(rng.uniform(0, math.log(max_ratio)))
    short = round(math.exp(rng.uniform(math.log(self.min_side),
                                       math.log(self.max_side / ratio))))
    short = min(max(short, self.min_side), self.max_side)
    long = min(round(short * ratio), self.max_side,
               math.floor(short * self.max_aspect))
    long = max(long, short)
    return (long, short) if rng.integers(2) else (short, long)

  def __getitem__(self, index: int) -> sources.Record:
    index = sources.check_index(index, self.size)
    rng = self._rng(index)
    attributes = self._draw_attributes(rng)
    image = _render(attributes, rng)
    buffer = io.BytesIO()
    if self.image_format == 'jpeg':
      image.save(buffer, format='JPEG', quality=90)
    elif self.image_format == 'png':
      image.save(buffer, format='PNG', compress_level=1)
    else:
      image.save(buffer, format='WEBP', quality=90)
    return sources.Record(index=index, image=buffer.getvalue(),
                          caption=attributes['caption'],
                          key=f'synthetic/{self.split}/{index}',
                          boxes=(attributes['region'],))


def _region(centre, radius: float, width: int, height: int,
            text: str) -> boxes.Region:
  """The square around the shape's circumcircle, in (ymin, xmin, ymax, xmax)
  normalised to the image; clipped, as the centre is clamped to keep the
  circle inside (rounding aside)."""
  (cx, cy), r = centre, radius
  return boxes.Region(max(0.0, (cy - r) / height), max(0.0, (cx - r) / width),
                      min(1.0, (cy + r) / height), min(1.0, (cx + r) / width),
                      text)


def _render(attributes: dict, rng: np.random.Generator) -> Image.Image:
  """Draws the background with numpy and the object with ImageDraw."""
  width, height = attributes['width'], attributes['height']
  background = attributes['background']
  angle = math.radians(background['gradient_degrees'])
  xs = np.linspace(0, math.cos(angle), width, dtype=np.float32)
  ys = np.linspace(0, math.sin(angle), height, dtype=np.float32)
  ramp = xs[None, :] + ys[:, None]
  ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
  start = np.asarray(background['start_rgb'], np.float32)
  end = np.asarray(background['end_rgb'], np.float32)
  pixels = start + ramp[..., None] * (end - start)
  pixels += background['noise_std'] * rng.standard_normal(
      (height, width, 3), dtype=np.float32)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  _draw_shape(ImageDraw.Draw(image), attributes)
  return image


def _draw_shape(draw: ImageDraw.ImageDraw, attributes: dict):
  shape, rgb = attributes['shape'], attributes['rgb']
  (cx, cy), r = attributes['centre'], attributes['radius']
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == 'circle':
    draw.ellipse(box, fill=rgb)
  elif shape == 'ring':
    draw.ellipse(box, outline=rgb, width=max(2, round(0.35 * r)))
  else:
    points = _OUTLINES[shape]()
    theta = math.radians(attributes['tilt'])
    rotation = np.array([[math.cos(theta), -math.sin(theta)],
                         [math.sin(theta), math.cos(theta)]])
    xy = (points @ rotation.T) * r + (cx, cy)
    draw.polygon([tuple(p) for p in xy], fill=rgb)


def _regular_polygon(sides: int, phase_degrees: float) -> np.ndarray:
  """Unit-circumradius polygon; y grows downwards as in image coordinates."""
  angles = np.radians(phase_degrees + 360 / sides * np.arange(sides))
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
  angles = np.radians(-90 + 36 * np.arange(10))
  radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross() -> np.ndarray:
  a, w = 0.95, 0.32  # Arm reach and half-width.
  return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                   (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)])


_OUTLINES = {
    'square': lambda: _regular_polygon(4, 45) * 0.95,
    'triangle': lambda: _regular_polygon(3, -90),
    'hexagon': lambda: _regular_polygon(6, 0),
    'diamond': lambda: np.array([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]),
    'star': _star,
    'cross': _cross,
}
