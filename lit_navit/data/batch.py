"""The packed batch: the one contract between the input pipeline and the model.

A batch is a dict of numpy (or jax) arrays with static shapes fixed by a
`BatchSpec`:

  image/patches  float32 [B, L, p*p*3]  pixels in [-1, 1], each patch flattened (py, px, c);
                 or uint8 in [0, 255] (input.patch_dtype), which the model
                 maps to [-1, 1] on the device: a quarter of the bytes to move
  image/yx       int32   [B, L, 2]      patch row and column inside its own image
  image/grid     int32   [B, E, 2]      each slot's image size in patches (rows, cols)
  image/segment  int32   [B, L]         0 = padding, k in 1..E = token of slot k
  valid          bool    [B, E]         slot k of row b holds an image
  index          int64   [B, E]         the source's example index of slot k, -1 if empty
  text/tokens    int32   [G, C, T]      captions of the filled slots (pad ids in empty rows)
  text/slot      int32   [G, C]         the slot a caption belongs to, within its group
  text/valid     bool    [G, C]         caption row c of group g holds a real pair

Within a row, the tokens of one slot are contiguous, slots are filled in
order 1..n with no gaps, and padding (segment 0) only follows the last slot.
Tokens of padding carry zero pixels and yx (0, 0).

Captions are stored only for filled slots, so the text tower encodes real
captions rather than E per row. The B rows split into G equal groups of
B/G rows (one group per device shard, so that the gather of image
embeddings to their captions never leaves a device); each group has a
capacity of C caption rows. Group g's filled slots, taken row by row and
slot by slot, own its caption rows 0, 1, ... in that order: row c holds
the caption of the slot at flat position `text/slot` = r*E + k, with r the
row's position inside the group. Rows past the group's last filled slot are
empty: pad tokens, slot 0, not valid. Every filled slot has its caption
(the packer stops filling a group when its captions run out), so the pairs
are exactly the filled slots.
"""

import dataclasses

import numpy as np

PAD_SEGMENT = 0
PATCH_DTYPES = ('float32', 'uint8')


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static shapes of one packed batch."""
  rows: int          # B
  tokens_per_row: int  # L
  slots: int         # E, images per row at most
  text_len: int      # T
  patch_size: int    # p
  groups: int = 1    # G, caption groups (device shards) the rows split into
  # C, caption rows per group; None: one per slot (B/G * E), never limiting.
  captions_per_group: int | None = None
  patch_dtype: str = 'float32'  # or 'uint8'

  def __post_init__(self):
    if self.patch_dtype not in PATCH_DTYPES:
      raise ValueError(f'patch dtype {self.patch_dtype!r}: expected one of '
                       f'{PATCH_DTYPES}')
    if self.groups < 1 or self.rows % self.groups:
      raise ValueError(f'{self.rows} rows do not split into {self.groups} '
                       'caption groups')
    if self.captions_per_group is not None and self.captions_per_group < 1:
      raise ValueError('captions_per_group must be >= 1, got '
                       f'{self.captions_per_group}')

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  @property
  def rows_per_group(self) -> int:
    return self.rows // self.groups

  @property
  def captions(self) -> int:
    """C, the caption rows of each group."""
    if self.captions_per_group is None:
      return self.rows_per_group * self.slots
    return self.captions_per_group

  def shapes(self) -> dict:
    """Key -> (shape, dtype) of every array in the batch."""
    b, l, e, t = self.rows, self.tokens_per_row, self.slots, self.text_len
    g, c = self.groups, self.captions
    return {
        'image/patches': ((b, l, self.patch_dim), np.dtype(self.patch_dtype)),
        'image/yx': ((b, l, 2), np.int32),
        'image/grid': ((b, e, 2), np.int32),
        'image/segment': ((b, l), np.int32),
        'valid': ((b, e), np.bool_),
        'index': ((b, e), np.int64),
        'text/tokens': ((g, c, t), np.int32),
        'text/slot': ((g, c), np.int32),
        'text/valid': ((g, c), np.bool_),
    }

  def empty(self, pad_id: int = 0) -> dict:
    """An all-padding batch: every slot and caption row empty."""
    batch = {k: np.zeros(s, d) for k, (s, d) in self.shapes().items()}
    batch['text/tokens'][:] = pad_id
    batch['index'][:] = -1
    return batch


def spec_of(batch) -> BatchSpec:
  """Reads the static shapes (and patch size) off a batch."""
  b, l, dim = batch['image/patches'].shape
  p = int(round((dim / 3) ** 0.5))
  e = batch['valid'].shape[1]
  g, c, t = batch['text/tokens'].shape
  return BatchSpec(rows=b, tokens_per_row=l, slots=e, text_len=t, patch_size=p,
                   groups=g, captions_per_group=c,
                   patch_dtype=np.dtype(batch['image/patches'].dtype).name)


def caption_slots(valid) -> list[np.ndarray]:
  """Per group, the flat in-group positions r*E + k of its filled slots, in order.

  `valid` is bool [B, E]; the groups are read off nothing else, so pass it
  reshaped [G, B/G, E] (or [B, E] for one group).
  """
  valid = np.asarray(valid)
  if valid.ndim == 2:
    valid = valid[None]
  return [np.flatnonzero(group.reshape(-1)) for group in valid]


def validate_batch(batch, spec: BatchSpec | None = None, pad_id: int = 0):
  """Checks a batch against the contract; raises ValueError naming the problem.

  Checks shapes and dtypes, value ranges, that each row's segments are
  contiguous runs 1..n followed by padding only, that valid slots are exactly
  the segments present, that yx lies inside each image's grid, and that the
  caption rows are exactly the filled slots, in order, with pad captions in
  the empty rows.
  """
  if spec is None:
    spec = spec_of(batch)
  shapes = spec.shapes()
  missing = set(shapes) - set(batch)
  if missing:
    raise ValueError(f'batch is missing keys {sorted(missing)}')
  for key, (shape, dtype) in shapes.items():
    arr = np.asarray(batch[key])
    if arr.shape != shape:
      raise ValueError(f'{key}: shape {arr.shape}, expected {shape}')
    if arr.dtype != dtype:
      raise ValueError(f'{key}: dtype {arr.dtype}, expected {np.dtype(dtype)}')

  patches = np.asarray(batch['image/patches'])
  segment = np.asarray(batch['image/segment'])
  yx = np.asarray(batch['image/yx'])
  grid = np.asarray(batch['image/grid'])
  valid = np.asarray(batch['valid'])
  index = np.asarray(batch['index'])

  if patches.dtype != np.uint8 and (
      not np.all(np.isfinite(patches)) or np.abs(patches).max(initial=0) > 1):
    raise ValueError('image/patches: values must be finite and in [-1, 1]')
  if segment.min() < 0 or segment.max() > spec.slots:
    raise ValueError(f'image/segment: values must be in 0..{spec.slots}')

  for r in range(spec.rows):
    seg = segment[r]
    # Non-decreasing segments with padding only at the end <=> contiguous runs.
    real = seg[seg != PAD_SEGMENT]
    n_real = real.size
    if np.any(seg[n_real:] != PAD_SEGMENT):
      raise ValueError(f'row {r}: padding tokens before image tokens')
    if np.any(np.diff(real) < 0) or np.any(np.diff(real) > 1):
      raise ValueError(f'row {r}: segments are not contiguous runs in slot order')
    n_slots = int(real.max()) if n_real else 0
    if n_real and real[0] != 1:
      raise ValueError(f'row {r}: first segment is {real[0]}, expected 1')
    expected_valid = np.arange(spec.slots) < n_slots
    if not np.array_equal(valid[r], expected_valid):
      raise ValueError(f'row {r}: valid {valid[r].tolist()} does not match '
                       f'the {n_slots} segments present')
    if np.any(index[r][valid[r]] < 0) or np.any(index[r][~valid[r]] != -1):
      raise ValueError(f'row {r}: index must be >= 0 for valid slots, -1 otherwise')
    if np.any(grid[r][~valid[r]] != 0) or np.any(grid[r][valid[r]] <= 0):
      raise ValueError(f'row {r}: grid must be positive for valid slots, 0 otherwise')
    pad = seg == PAD_SEGMENT
    if np.any(patches[r][pad] != 0) or np.any(yx[r][pad] != 0):
      raise ValueError(f'row {r}: padding tokens must carry zero pixels and yx')
    if n_real:
      slot_grid = grid[r][real - 1]
      if np.any(yx[r][~pad] < 0) or np.any(yx[r][~pad] >= slot_grid):
        raise ValueError(f'row {r}: a token yx lies outside its image grid')
  _validate_captions(batch, spec, valid, pad_id)


def _validate_captions(batch, spec: BatchSpec, valid, pad_id: int):
  tokens = np.asarray(batch['text/tokens'])
  slot = np.asarray(batch['text/slot'])
  text_valid = np.asarray(batch['text/valid'])
  groups = valid.reshape(spec.groups, spec.rows_per_group, spec.slots)
  for g, filled in enumerate(caption_slots(groups)):
    n = filled.size
    if n > spec.captions:
      raise ValueError(f'group {g}: {n} filled slots exceed its '
                       f'{spec.captions} caption rows')
    if not np.array_equal(text_valid[g], np.arange(spec.captions) < n):
      raise ValueError(f'group {g}: text/valid must mark exactly its first {n} '
                       'caption rows, one per filled slot')
    if not np.array_equal(slot[g, :n], filled):
      raise ValueError(f'group {g}: text/slot {slot[g, :n].tolist()} is not '
                       f'its filled slots in order {filled.tolist()}')
    if np.any(slot[g, n:] != 0) or np.any(tokens[g, n:] != pad_id):
      raise ValueError(f'group {g}: an empty caption row carries a slot or tokens')
