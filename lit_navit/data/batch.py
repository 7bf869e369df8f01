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

With text packing (`BatchSpec.text_rows` set) the captions are packed too,
several to a text row of T tokens, as the images are to a row:

  text/tokens   int32 [G, R, T]  R text rows a group: captions back to back, pad ids after
  text/segment  int32 [G, R, T]  0 = padding, k in 1..n = token of the row's k-th caption
  text/position int32 [G, R, T]  each token's position inside its caption (0 for padding)
  text/row      int32 [G, C]     caption c's text row within its group (0 if empty)
  text/row_segment int32 [G, C]  caption c's segment in that row (0 if empty)

`text/slot` and `text/valid` keep their meaning: caption c still belongs to
the filled slot `text/slot`, so the pairs stay exactly the filled slots. A
caption is its tokens up to its last non-pad one (at least one token, so an
all-pad caption keeps a segment), positions 0, 1, ...; within a row its
segments are contiguous runs 1..n and padding only follows the last one.

Two keys serve SigLIP 2's self-distillation and masked prediction; each is
present only when its feature is on (train mode, `input.local_crops.count`
> 0, `input.mask_ratio` > 0), and a batch without them is as above:

  image/parent  int32 [B, E]  0 for a global image or an empty slot; for a
                local crop (`crops.py`) in slot k of row b, the slot (1..E)
                of the image it was cut from, in the same row b, before k
  image/masked  bool  [B, L]  the tokens of a global image that the student's
                masked-prediction pass replaces with the mask token: of its
                n tokens, round(input.mask_ratio * n) (half up), at least 1
                and at most n - 1 when n > 1, none when n == 1
                (`masking.masked_count`); never a crop's token or padding

A local crop is an image slot like any other (`image/*`, `valid`), and its
`index` is its parent's (the example its pixels came from: `index` of the
valid slots stays >= 0 and names a source example). The pipeline packs a
parent and its crops as one unit: parent first, its crops in the slots right
after it. Crops have no caption: the caption rows belong to the global
images (valid slots with `image/parent` 0), so `text/slot` never names a
crop and the pairs `text/valid` marks are exactly the global images.

LocCa's box tasks (`boxes.py`: referring expressions and grounded
captioning) add three keys, present only in train mode with
`input.box_tasks` on (`BatchSpec.box_tasks`):

  box/tokens  int32 [G, C, T]  caption place c's box task sequence in the
              decoder's vocabulary (`boxes.BoxFormat`); pad ids where
              box/valid is False
  box/target  bool  [G, C, T]  the positions whose token is a target (never
              position 0, the task token); all False where box/valid is
  box/valid   bool  [G, C]     place c holds a box task: text/valid[c] and
              the image of slot text/slot[c] has a box

Place c belongs to the image of caption place c (`text/slot`) in both text
layouts; a local crop has no caption place, so never a box task. Boxes are
normalised to the image as packed (EXIF-turned as decoded, resized whole).
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
  # R, text rows per group with text packing; None: one caption a row.
  text_rows: int | None = None
  local_crops: bool = False  # The batch has image/parent.
  masks: bool = False        # The batch has image/masked.
  box_tasks: bool = False    # The batch has box/tokens, box/target, box/valid.

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
    if self.text_rows is not None and self.text_rows < 1:
      raise ValueError(f'text_rows must be >= 1, got {self.text_rows}')

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

  @property
  def packed_text(self) -> bool:
    return self.text_rows is not None

  def shapes(self) -> dict:
    """Key -> (shape, dtype) of every array in the batch."""
    b, l, e, t = self.rows, self.tokens_per_row, self.slots, self.text_len
    g, c = self.groups, self.captions
    if self.packed_text:
      text = {key: ((g, self.text_rows, t), np.int32)
              for key in ('text/tokens', 'text/segment', 'text/position')}
      text.update({key: ((g, c), np.int32)
                   for key in ('text/row', 'text/row_segment')})
    else:
      text = {'text/tokens': ((g, c, t), np.int32)}
    shapes = {
        'image/patches': ((b, l, self.patch_dim), np.dtype(self.patch_dtype)),
        'image/yx': ((b, l, 2), np.int32),
        'image/grid': ((b, e, 2), np.int32),
        'image/segment': ((b, l), np.int32),
        'valid': ((b, e), np.bool_),
        'index': ((b, e), np.int64),
        **text,
        'text/slot': ((g, c), np.int32),
        'text/valid': ((g, c), np.bool_),
    }
    if self.local_crops:
      shapes['image/parent'] = ((b, e), np.int32)
    if self.masks:
      shapes['image/masked'] = ((b, l), np.bool_)
    if self.box_tasks:
      shapes['box/tokens'] = ((g, c, t), np.int32)
      shapes['box/target'] = ((g, c, t), np.bool_)
      shapes['box/valid'] = ((g, c), np.bool_)
    return shapes

  def empty(self, pad_id: int = 0) -> dict:
    """An all-padding batch: every slot and caption row empty."""
    batch = {k: np.zeros(s, d) for k, (s, d) in self.shapes().items()}
    batch['text/tokens'][:] = pad_id
    if self.box_tasks:
      batch['box/tokens'][:] = pad_id
    batch['index'][:] = -1
    return batch


def spec_of(batch) -> BatchSpec:
  """Reads the static shapes (and patch size) off a batch."""
  b, l, dim = batch['image/patches'].shape
  p = int(round((dim / 3) ** 0.5))
  e = batch['valid'].shape[1]
  g, rows, t = batch['text/tokens'].shape
  c = batch['text/slot'].shape[1]
  return BatchSpec(rows=b, tokens_per_row=l, slots=e, text_len=t, patch_size=p,
                   groups=g, captions_per_group=c,
                   patch_dtype=np.dtype(batch['image/patches'].dtype).name,
                   text_rows=rows if 'text/segment' in batch else None,
                   local_crops='image/parent' in batch,
                   masks='image/masked' in batch,
                   box_tasks='box/valid' in batch)


def global_slots(batch) -> np.ndarray:
  """bool [B, E]: the slots that hold a global image (not a local crop),
  the ones with captions."""
  valid = np.asarray(batch['valid'])
  if 'image/parent' not in batch:
    return valid
  return valid & (np.asarray(batch['image/parent']) == 0)


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
  the empty rows. With local crops: that each crop's parent is a global
  image before it in its row, and the caption rows are the global images';
  with masks: that only global images' tokens are masked; with box tasks:
  that they sit only at real caption places, with targets, pad ids elsewhere.
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
  if spec.local_crops:
    _validate_parents(np.asarray(batch['image/parent']), valid)
  if spec.masks:
    is_crop = np.zeros_like(valid) if not spec.local_crops else (
        np.asarray(batch['image/parent']) > 0)
    _validate_masked(np.asarray(batch['image/masked']), segment, is_crop)
  _validate_captions(batch, spec, global_slots(batch), pad_id)
  if spec.box_tasks:
    _validate_box_tasks(batch, pad_id)


def _validate_box_tasks(batch, pad_id: int):
  """Box tasks only at real caption places, each with a target after its task
  token; an empty place holds pad ids and no target. (A target may be the
  pad id: SigLIP's tokenizer pads with its EOS, which GCap predicts.)"""
  tokens = np.asarray(batch['box/tokens'])
  target = np.asarray(batch['box/target'])
  valid = np.asarray(batch['box/valid'])
  if np.any(valid & ~np.asarray(batch['text/valid'])):
    raise ValueError('box/valid: a box task at an empty caption place')
  if np.any(tokens[~valid] != pad_id) or np.any(target[~valid]):
    raise ValueError('box/tokens: a place without a box task carries tokens '
                     'or targets')
  if np.any(target[..., 0]) or not np.all(target[valid].any(-1)):
    raise ValueError('box/target: a box task needs a target, and its task '
                     'token (position 0) is none')


def _validate_parents(parent, valid):
  """Each crop's parent: a global image of its own row, in an earlier slot."""
  slots = valid.shape[1]
  if np.any(parent[~valid] != 0):
    raise ValueError('image/parent: an empty slot has a parent')
  for r, k in zip(*np.nonzero(parent)):
    p = int(parent[r, k])
    # Slots are filled in order, so one before a filled slot is filled too.
    if not 1 <= p <= k:
      raise ValueError(f'row {r} slot {k + 1}: image/parent {p} is not a '
                       f'filled slot of its row before it (1..{k} of {slots})')
    if parent[r, p - 1]:
      raise ValueError(f'row {r} slot {k + 1}: image/parent {p} is a crop, '
                       'not a global image')


def _validate_masked(masked, segment, is_crop):
  """Masks only on global images' tokens: never padding, never a crop."""
  if np.any(masked & (segment == PAD_SEGMENT)):
    raise ValueError('image/masked: a padding token is masked')
  rows = np.arange(segment.shape[0])[:, None]
  crop_token = is_crop[rows, np.maximum(segment - 1, 0)] & (segment != PAD_SEGMENT)
  if np.any(masked & crop_token):
    raise ValueError('image/masked: a local crop\'s token is masked')


def _validate_captions(batch, spec: BatchSpec, valid, pad_id: int):
  """`valid`: the slots that own a caption (the global images)."""
  if spec.packed_text:
    _validate_text_rows(batch, spec, pad_id)
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
    if np.any(slot[g, n:] != 0) or (not spec.packed_text and
                                    np.any(tokens[g, n:] != pad_id)):
      raise ValueError(f'group {g}: an empty caption row carries a slot or tokens')
    if spec.packed_text:
      _validate_caption_places(batch, g, n)


def _validate_text_rows(batch, spec: BatchSpec, pad_id: int):
  """Each text row: caption segments 1..n in runs, positions 0.. per run, pad after."""
  tokens = np.asarray(batch['text/tokens'])
  segment = np.asarray(batch['text/segment'])
  position = np.asarray(batch['text/position'])
  for g in range(spec.groups):
    for r in range(spec.text_rows):
      seg, pos, tok = segment[g, r], position[g, r], tokens[g, r]
      where = f'group {g} text row {r}'
      n_real = np.count_nonzero(seg)
      if np.any(seg[n_real:] != PAD_SEGMENT) or np.any(seg[:n_real] == PAD_SEGMENT):
        raise ValueError(f'{where}: padding tokens before caption tokens')
      real = seg[:n_real]
      if n_real and (real[0] != 1 or np.any(np.diff(real) < 0)
                     or np.any(np.diff(real) > 1)):
        raise ValueError(f'{where}: caption segments are not runs 1..n in order')
      starts = np.flatnonzero(np.diff(real, prepend=0))
      expected = np.arange(n_real) - np.repeat(starts, np.diff(starts, append=n_real))
      if not np.array_equal(pos[:n_real], expected) or np.any(pos[n_real:] != 0):
        raise ValueError(f'{where}: positions must restart at 0 for each '
                         'caption and be 0 on padding')
      if np.any(tok[n_real:] != pad_id):
        raise ValueError(f'{where}: padding tokens must carry the pad id')
      # A caption ends at its last real token; an all-pad one is one token.
      ends = np.append(starts[1:], n_real) - 1
      if np.any((tok[ends] == pad_id) & (ends > starts)):
        raise ValueError(f'{where}: a caption carries pad tokens after its last '
                         'real token')


def _validate_caption_places(batch, g: int, n: int):
  """Group g's n captions sit each in its own (row, segment), and together
  they are every caption segment of the group's text rows."""
  row = np.asarray(batch['text/row'])[g]
  row_segment = np.asarray(batch['text/row_segment'])[g]
  segment = np.asarray(batch['text/segment'])[g]
  if np.any(row[n:] != 0) or np.any(row_segment[n:] != 0):
    raise ValueError(f'group {g}: an empty caption has a text row or segment')
  places = set(zip(row[:n].tolist(), row_segment[:n].tolist()))
  present = {(r, k) for r in range(segment.shape[0])
             for k in range(1, int(segment[r].max(initial=0)) + 1)}
  if len(places) != n or places != present:
    raise ValueError(f'group {g}: text/row and text/row_segment do not name '
                     'each caption segment of the text rows exactly once')
