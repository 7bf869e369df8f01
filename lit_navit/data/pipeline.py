"""The input pipeline: records -> packed batches, with exact save and restore.

One `Pipeline` serves training and evaluation:

  train  this host's records streamed from its own files, interleaved and
         shuffled (`streaming.RecordStream`: sequential reads, no index of
         the data set), repeated forever; resolutions sampled, tokens
         dropped, patch size sampled per step (FlexiViT) as a function of
         (seed, step), the same on every host.
  eval   this host's block of a random-access source once, in order
         (`sources.host_shard`); each image sized by 'fit' (the
         token budget, NaFlex) or 'native' (its own size, shrunk only to
         fit the budget), nothing dropped; the last batch is padded with
         empty slots, then StopIteration.

Each step tops a buffer of pending images up to `pack_buffer` (each
decoded and resized to its grid for every patch size as it arrives, by
`workers.prepare_image`), plans which of them fill the batch's rows (by
token counts alone), then patchifies and drops tokens of the chosen ones.
Images are prepared on a thread pool (`workers`) or in worker processes
(`worker_processes`); results are taken in submission order, so batches do
not depend on the kind or number of workers.

In train mode, SigLIP 2's self-distillation inputs, each off by default:
`local_crops` gives each image `count` small crops (`crops.py`), cut from the
decoded image and packed in its row right after it (`image/parent`);
`mask_ratio` marks that fraction of each image's tokens for masked
prediction (`masking.py`, `image/masked`). Eval mode makes neither.

Every random choice is keyed: an image's resolution by (seed, index, epoch),
its drop rate and dropped patches by (seed, index, step), its crops' boxes
by (seed, index, epoch, crop number), its token mask by (seed, index,
epoch), the patch size by (seed, step), where `index` is the record's
stable example id (see `readers.example_id`). The state therefore holds only positions and record
references, never pixels, and a restored pipeline recomputes everything else.

Resuming needs the same number of hosts: each host's stream position is
only meaningful for the files that host was given.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math

import ml_collections
import numpy as np

from lit_navit.data import batch as batch_lib
from lit_navit.data import crops as crops_lib
from lit_navit.data import decode
from lit_navit.data import dropping
from lit_navit.data import masking
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.data import readers
from lit_navit.data import resolution
from lit_navit.data import retry
from lit_navit.data import sources
from lit_navit.data import streaming
from lit_navit.data import text
from lit_navit.data import workers

MODES = ('train', 'eval')
STATE_VERSION = 2
_PATCH_SIZE_TAG = 0x7073


def default_config() -> ml_collections.ConfigDict:
  """The `input` config: every key the pipeline reads, with its default."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # 'train' or 'eval'.
  config.source = sources.default_source_config()
  config.tokenizer = text.default_tokenizer_path()  # A sentencepiece model.
  config.sticky_eos = False  # Keep EOS when a caption is truncated.
  # Padding id; unset: the tokenizer model's (SigLIP pads with 1, its EOS).
  config.pad_id = ml_collections.config_dict.placeholder(int)
  config.lowercase = False  # Lowercase captions first (SigLIP, SigLIP 2).
  config.tokens_per_row = 256  # L, image tokens per packed row.
  config.images_per_row = 16  # E, image slots per row (a local crop takes one).
  config.text_len = 16  # T, tokens per caption.
  # Caption rows per packed row, on average over a caption group (a device
  # shard's rows): the text tower encodes only these, so size it a little
  # above the images a row holds (the `images_per_row` statistic); the
  # packer stops filling a group when its captions run out. None: one per
  # slot (E), which never limits packing but encodes every empty slot.
  config.captions_per_row = ml_collections.config_dict.placeholder(float)
  # Pack the captions too: several to a text row of text_len tokens, best-fit,
  # each attending only to itself (see batch.py). The text tower then
  # encodes real caption tokens, not a whole row of padding per caption.
  config.text_packing = False
  # Text rows per caption row (text packing): size it a little above the
  # mean caption length over text_len (the pipeline's `text_rows_per_caption`
  # statistic); the packer stops filling a group when its text rows are full.
  config.text_rows_per_caption = 0.3
  # FlexiViT: one is drawn per step from (seed, step); eval needs exactly one.
  config.patch_sizes = (16,)
  # How patches cross to the device: 'uint8' pixels (normalised there, a
  # quarter of float32's bytes: 201 MB per chip per step at B/16) or
  # 'float32' in [-1, 1]. The model's numbers are the same either way.
  config.patch_dtype = 'float32'
  config.resolution = ml_collections.ConfigDict(dict(
      # 'side' (longer side), 'area' (sqrt of area), 'fit' (fill the budget)
      # or 'native' (own size within the budget); see `resolution`. Eval
      # keeps 'fit' and 'native' and turns the sampled modes into 'fit'.
      mode='side',
      dist='uniform',  # 'uniform' or 'truncated_normal'.
      min=64,  # Pixels.
      max=256,
      mean=-0.5,  # truncated_normal: N(mean, std) on [-1, 1] -> [min, max].
      std=1.0,
      # Most tokens of one image in every mode, and the budget that 'fit'
      # mode fills; None = a full row.
      max_tokens=None,
  ))
  config.token_drop = ml_collections.ConfigDict(dict(
      kind='none',  # 'none', 'constant', 'beta' or 'resolution'.
      rate=0.0,  # constant and beta: the (mean) rate.
      rate_min=0.0,  # resolution: mean rate at 1 token ...
      rate_max=0.5,  # ... and at a full row.
      resolution_sd=0.02,
      schedule_steps=0,  # Rates scale linearly from 1x at step 0 to
      schedule_end_factor=1.0,  # this factor at schedule_steps; 0 = off.
  ))
  # SILC / SigLIP 2 local crops (train mode): `count` crops of each image
  # (0 = off), packed in its row after it, with no caption (crops.py). A
  # crop covers a fraction of the image's area uniform in [min_scale,
  # max_scale], aspect ratio log-uniform in [3/4, 4/3], and is sized to at
  # most max_tokens patches with its aspect kept. An image's own budget is
  # then resolution.max_tokens, or when unset what its crops leave of a row.
  config.local_crops = ml_collections.ConfigDict(dict(
      count=0, min_scale=0.05, max_scale=0.4, max_tokens=16))
  # Masked prediction (train mode): the fraction of each image's tokens
  # marked in image/masked (masking.py); 0 = off, TIPS / SigLIP 2: 0.5.
  config.mask_ratio = 0.0
  # Decoded images waiting to be packed. More packs tighter; it should
  # exceed rows * (images per row) by a good margin.
  config.pack_buffer = 256
  config.shuffle = True  # Train mode: shuffle file order and records.
  # Train mode streaming: data files open at once (read in turn), and the
  # records of the shuffle buffer (more mixes better and costs memory and
  # re-reads on restore: each is one small read).
  config.cycle_length = 16
  config.shuffle_buffer = 1000
  # Storage errors while reading: retries after the first try, and the
  # pause before the first retry (doubling each time), in seconds.
  config.read_retries = 3
  config.retry_delay = 0.5
  config.max_pixels = decode.DEFAULT_MAX_PIXELS  # Larger images are skipped.
  config.workers = 4  # Decode/resize threads; 0 runs them inline.
  # Decode/resize in this many worker processes instead (data/workers.py):
  # what scales on a many-core host. 0 leaves it to the threads.
  config.worker_processes = 0
  # Stop when more than this fraction of the last `bad_record_window`
  # records failed: a broken source, not a few bad records.
  config.bad_record_budget = 0.1
  config.bad_record_window = 1000
  return config


@dataclasses.dataclass
class _Pending:
  """An image waiting for a row, at its grid for each patch size."""
  index: int
  epoch: int
  image: workers.Prepared
  tokens: np.ndarray
  ref: streaming.Ref | None = None  # Train: where the record lies.
  caption_length: int = 0  # Its tokens in a packed text row.


class Pipeline:
  """Iterator of packed numpy batches of `rows` rows each (see module doc).

  Args:
    source: train: a `readers` reader, or a random-access `sources.Source`
      (read through `readers.IndexedReader`); eval: a `sources.Source`.
    tokenizer: has `encode(list[str]) -> int32 [N, text_len]` and `pad_id`.
    config: the `input` config (`default_config()`).
    rows: B, rows per batch on this host.
    seed: the data seed.
    process_index, process_count: this host and the number of hosts; each
      reads its own `sources.host_shard`.
    groups: the caption groups the rows split into: the device shards of
      this host's rows (see `batch.py`).
    box_format: the box tasks' token format (`boxes.format_from_config`),
      with input.box_tasks on; None otherwise.

  Attributes:
    skipped: a `decode.SkipCounter` of records (and files) skipped, by
      reason.
  """

  def __init__(self, source, tokenizer, config, *, rows: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               groups: int = 1, box_format=None):
    _check_config(config)
    if rows < 1:
      raise ValueError(f'rows must be >= 1, got {rows}')
    if groups < 1 or rows % groups:
      raise ValueError(f'{rows} rows do not split into {groups} caption groups '
                       '(one per device shard)')
    self._groups = groups
    self._box_format = box_format
    self._source = source
    self._tokenizer = tokenizer
    if config.mode == 'eval' and config.text_packing:
      # Evaluation embeds texts one a row (Embedder.texts): a packing that
      # also placed captions would only change which images share a row.
      config = config.copy_and_resolve_references()
      config.text_packing = False
    self._config = config
    self._rows = rows
    self._seed = seed
    self._process = (process_index, process_count)
    self._train = config.mode == 'train'
    if self._train:
      reader = (source if isinstance(source, readers.Reader)
                else readers.IndexedReader(source))
      self._stream = streaming.RecordStream(
          reader, seed=seed, process_index=process_index,
          process_count=process_count, shuffle=config.shuffle,
          cycle_length=config.cycle_length,
          shuffle_buffer=config.shuffle_buffer,
          retry_policy=retry.RetryPolicy(config.read_retries,
                                         config.retry_delay),
          bad_file_budget=config.bad_record_budget,
          on_skip=lambda reason, detail: self.skipped.add(reason))
    else:
      if isinstance(source, readers.Reader):
        raise TypeError('eval mode reads a random-access sources.Source, not '
                        f'a streaming reader ({type(source).__name__})')
      self._shard = sources.host_shard(len(source), process_index,
                                       process_count)
    self._resolution = config.resolution.copy_and_resolve_references()
    self._token_drop = config.token_drop.copy_and_resolve_references()
    if not self._train:
      # Eval draws nothing: sampled sizes give way to the budget.
      if self._resolution.mode not in resolution.EVAL_MODES:
        self._resolution.mode = 'fit'
      self._token_drop.kind = 'none'
    self._crops = (crops_lib.from_config(config.local_crops) if self._train
                   else None)
    self._mask_ratio = config.mask_ratio if self._train else 0.0
    self._max_tokens = self._resolution.max_tokens or (
        config.tokens_per_row - _crop_budget(config, self._crops))
    self._sizing = workers.Sizing(
        seed=seed, patch_sizes=tuple(config.patch_sizes),
        resolution=self._resolution, max_tokens=self._max_tokens,
        max_pixels=config.max_pixels, crops=self._crops)
    self._pool = (concurrent.futures.ThreadPoolExecutor(config.workers)
                  if config.workers else None)
    self._processes = (workers.ProcessPool(config.worker_processes)
                       if config.worker_processes else None)
    self.skipped = decode.SkipCounter()
    self._reset()

  def _reset(self):
    self._step = 0
    self._position = 0  # Eval: the next place in this host's block.
    self._buffer = []
    self._records_read = 0
    self._recent_failures = collections.deque()
    self._last_failure = None  # 'key (reason)', for the budget's message
    self._totals = collections.Counter()

  # Iteration.

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self._fill()
    if not self._buffer:
      raise StopIteration
    step = self._step
    patch_size = self.patch_size_at(step)
    kept = [self._kept_tokens(item, self._grid(item, patch_size), step)
            for item in self._buffer]
    # Plan from token counts alone; only the chosen images are patchified.
    # An image and its crops are one unit: their tokens, a slot each.
    spec = self.batch_spec(patch_size)
    text_rows = {}
    if spec.packed_text:
      text_rows = dict(caption_lengths=[item.caption_length for item in self._buffer],
                       text_rows=spec.text_rows, text_len=spec.text_len)
    sizes = [keep + sum(math.prod(crop.grids[patch_size])
                        for crop in item.image.crops)
             for item, keep in zip(self._buffer, kept)]
    unit_slots = [1 + len(item.image.crops) for item in self._buffer]
    planned = packing.plan(sizes, spec.rows, spec.tokens_per_row, spec.slots,
                           groups=spec.groups, captions=spec.captions,
                           unit_slots=unit_slots, **text_rows)
    plan = planned.rows
    images = iter(self._map(
        lambda position: self._packed_image(
            self._buffer[position], kept[position],
            planned.text_row.get(position), patch_size=patch_size, step=step),
        [position for row in plan for position in row]))
    rows = [[next(images) for _ in row] for row in plan]
    batch = packing.pack_batch(rows, spec, self._tokenizer.pad_id)
    taken = {position for row in plan for position in row}
    self._buffer = [item for position, item in enumerate(self._buffer)
                    if position not in taken]
    self._step += 1
    self._count(batch)
    return batch

  def batch_spec(self, patch_size: int) -> batch_lib.BatchSpec:
    """The static shapes of this pipeline's batches at `patch_size`."""
    return batch_spec(self._config, rows=self._rows, groups=self._groups,
                      patch_size=patch_size)

  def patch_size_at(self, step: int) -> int:
    """The patch size of batch `step`: a function of (seed, step) only."""
    sizes = tuple(self._config.patch_sizes)
    if len(sizes) == 1:
      return sizes[0]
    rng = np.random.default_rng([self._seed, _PATCH_SIZE_TAG, step])
    return sizes[rng.integers(len(sizes))]

  def _grid(self, item: _Pending, patch_size: int) -> tuple[int, int]:
    return item.image.grids[patch_size]

  def _kept_tokens(self, item: _Pending, grid, step: int) -> int:
    num_tokens = grid[0] * grid[1]
    rate = dropping.drop_rate(
        self._token_drop, seed=self._seed, index=item.index, step=step,
        num_tokens=num_tokens, max_tokens=self._config.tokens_per_row)
    return dropping.kept_count(num_tokens, rate)

  def _packed_image(self, item: _Pending, keep: int, text_row: int | None, *,
                    patch_size: int, step: int) -> packing.PackedImage:
    """An image patchified, its tokens dropped and masked, and its crops
    patchified (whole: crops are never dropped nor masked)."""
    dtype = self._config.patch_dtype
    patches = dropping.drop_patches(
        patches_lib.patchify(item.image.resized[patch_size], patch_size, dtype),
        keep, seed=self._seed, index=item.index, step=step)
    crops = tuple(patches_lib.patchify(crop.resized[patch_size], patch_size,
                                       dtype)
                  for crop in item.image.crops)
    masked = None
    if self._mask_ratio > 0:
      masked = masking.token_mask(len(patches), self._mask_ratio,
                                  seed=self._seed, index=item.index,
                                  epoch=item.epoch)
    return packing.PackedImage(patches, item.tokens, item.index, text_row,
                               crops, masked)

  def _map(self, fn, items) -> list:
    """fn over items, in order, on the thread pool when there is one."""
    if self._pool is None:
      return [fn(item) for item in items]
    return list(self._pool.map(fn, items))

  # Reading records.

  def _fill(self):
    """Tops the buffer up to `pack_buffer` decoded images (less at the end of eval)."""
    while len(self._buffer) < self._config.pack_buffer:
      wanted = self._config.pack_buffer - len(self._buffer)
      read = self._read(wanted)
      if not read:
        return
      loaded = self._prepare(read)
      for (_, _, record), (image, reason) in zip(read, loaded):
        self._account_record(record, reason)
      self._buffer.extend(self._pending(
          [(epoch, ref, record, image)
           for (epoch, ref, record), (image, _) in zip(read, loaded)
           if image is not None]))

  def _read(self, wanted: int) -> list:
    """Up to `wanted` (epoch, ref or None, record) read next."""
    if self._train:
      return [(ref.epoch, ref, record)
              for ref, record in itertools.islice(self._stream, wanted)]
    indices = self._shard[self._position:self._position + wanted]
    self._position += len(indices)
    # A batch's `index` is the position in the source given (a subset's
    # records may carry their parent's indices).
    return [(0, None, dataclasses.replace(record, index=index)) for index, record
            in zip(indices, self._map(self._source.__getitem__, indices))]

  def _prepare(self, read: list) -> list:
    """[(workers.Prepared or None, skip reason or None)] of [(epoch, ref,
    record)], on the worker processes or threads."""
    jobs = [(record.image, record.index, epoch, self._sizing)
            for epoch, _, record in read if not record.error]
    if self._processes is not None:
      done = iter(self._processes.map(workers.prepare_image, jobs))
    else:
      done = iter(self._map(lambda job: workers.prepare_image(*job), jobs))
    return [(None, record.error.split(':')[0]) if record.error else next(done)
            for _, _, record in read]

  def _pending(self, decoded: list) -> list:
    """Pending images from [(epoch, ref, record, image)], captions tokenized."""
    if not decoded:
      return []
    captions = [record.caption for _, _, record, _ in decoded]
    tokens = np.asarray(self._tokenizer.encode(captions), np.int32)
    if tokens.shape != (len(decoded), self._config.text_len):
      raise ValueError(f'the tokenizer returned captions of shape {tokens.shape}'
                       f'; input.text_len is {self._config.text_len}')
    pad_id = self._tokenizer.pad_id
    return [_Pending(record.index, epoch, image, row, ref,
                     packing.caption_length(row, pad_id))
            for (epoch, ref, record, image), row in zip(decoded, tokens)]

  def _account_record(self, record, reason):
    """Counts a read record; raises if the recent failure rate is too high."""
    self._records_read += 1
    window = self._config.bad_record_window
    if reason is not None:
      self.skipped.add(reason)
      self._recent_failures.append(self._records_read)
      self._last_failure = f'{record.key} ({reason})'
      logging.debug('skipped %s: %s', record.key, reason)
    while (self._recent_failures and
           self._recent_failures[0] <= self._records_read - window):
      self._recent_failures.popleft()
    budget = self._config.bad_record_budget
    if (self._records_read >= window and
        len(self._recent_failures) > budget * window):
      raise streaming.BrokenSource(
          f'{len(self._recent_failures)} of the last {window} records failed '
          f'(input.bad_record_budget is {budget:.0%}): the source looks '
          f'broken, not a few bad records. Skipped so far: '
          f'{self.skipped.counts}; the last failure was '
          f'{self._last_failure or "before this run resumed"}.')

  # Statistics.

  def _count(self, batch: dict):
    segment = batch['image/segment']
    self._totals['batches'] += 1
    self._totals['rows'] += segment.shape[0]
    self._totals['tokens'] += segment.size
    self._totals['image_tokens'] += int(np.count_nonzero(segment))
    # Global images only: a local crop has no caption.
    self._totals['images'] += int(batch_lib.global_slots(batch).sum())
    self._totals['caption_rows'] += batch['text/valid'].size
    text = batch['text/tokens']
    self._totals['text_tokens'] += text.size
    self._totals['text_pad_tokens'] += int(np.sum(text == self._tokenizer.pad_id))

  @property
  def stats(self) -> dict:
    """Running figures for logging, over all batches produced so far."""
    t = self._totals
    return {
        'batches': t['batches'],
        'images': t['images'],
        'padding_fraction': 1 - t['image_tokens'] / max(1, t['tokens']),
        'images_per_row': t['images'] / max(1, t['rows']),
        # Caption rows the text tower encodes for no pair.
        'empty_caption_fraction': 1 - t['images'] / max(1, t['caption_rows']),
        # Pad tokens the text tower encodes, and the text rows a pair's
        # caption fills (what input.text_rows_per_caption sizes).
        'text_padding_fraction': t['text_pad_tokens'] / max(1, t['text_tokens']),
        'text_rows_per_caption': (t['text_tokens'] - t['text_pad_tokens'])
                                 / self._config.text_len / max(1, t['images']),
        'skipped': self.skipped.total,
    }

  # State.

  def get_state(self) -> dict:
    """The iterator's position as JSON-serialisable scalars and short lists.

    Holds the step; in train mode the record stream's state
    (`streaming.RecordStream.get_state`) and each image pending in the
    packer buffer as a reference [file, position, record, epoch]; in eval
    mode the position in this host's block and the pending [index, epoch];
    skip counts and the bad-record window. No pixels, no record bytes.
    """
    state = {
        'version': STATE_VERSION,
        'seed': self._seed,
        'process_index': self._process[0],
        'process_count': self._process[1],
        'groups': self._groups,
        'mode': self._config.mode,
        'step': self._step,
        'skipped': self.skipped.as_dict(),
        'records_read': self._records_read,
        'recent_failures': list(self._recent_failures),
        'totals': dict(self._totals),
    }
    if self._train:
      state['stream'] = self._stream.get_state()
      state['pending'] = [list(item.ref) for item in self._buffer]
    else:
      state['position'] = self._position
      state['pending'] = [[item.index, item.epoch] for item in self._buffer]
    return state

  def set_state(self, state: dict):
    """Restores `get_state()` output: the next batch is the one that followed it.

    Buffered and pending records are re-read from their references and
    pending images re-decoded.
    """
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'pipeline state version {state.get("version")}, '
                       f'expected {STATE_VERSION}: a data state from another '
                       'version of lit_navit cannot be resumed exactly')
    if state.get('process_count') != self._process[1]:
      raise ValueError(
          f'the data state was saved by a run on {state.get("process_count")} '
          f'hosts and this run has {self._process[1]}: each host streams its '
          'own files, so a run resumes exactly only on the same number of '
          'hosts')
    expected = {'seed': self._seed, 'process_index': self._process[0],
                'groups': self._groups, 'mode': self._config.mode}
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(f'pipeline state has {key}={state.get(key)!r} but '
                         f'this pipeline has {value!r}; the run cannot resume '
                         'exactly')
    self._reset()
    self._step = int(state['step'])
    self._records_read = int(state['records_read'])
    self._recent_failures.extend(int(n) for n in state['recent_failures'])
    self._totals.update({k: int(v) for k, v in state['totals'].items()})
    self.skipped = decode.SkipCounter(state['skipped'])
    if self._train:
      self._stream.set_state(state['stream'], map_fn=self._map)
      refs = [streaming.Ref(*map(int, ref)) for ref in state['pending']]
      read = [(ref.epoch, ref, record) for ref, record in
              zip(refs, self._stream.read_refs(refs, map_fn=self._map))]
    else:
      self._position = int(state['position'])
      pending = [(int(index), int(epoch)) for index, epoch in state['pending']]
      read = [(epoch, None, dataclasses.replace(record, index=index))
              for (index, epoch), record in zip(pending, self._map(
                  self._source.__getitem__, [index for index, _ in pending]))]
    loaded = self._prepare(read)
    for (_, _, record), (image, reason) in zip(read, loaded):
      if image is None:
        raise RuntimeError(f'pending example {record.index} ({record.key}) no '
                           f'longer decodes ({reason}): has the source changed?')
    self._buffer = self._pending(
        [(epoch, ref, record, image)
         for (epoch, ref, record), (image, _) in zip(read, loaded)])

  def close(self):
    """Stops the workers and closes the open files."""
    if self._pool is not None:
      self._pool.shutdown()
    if self._processes is not None:
      self._processes.close()
    if self._train:
      self._stream.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def batch_spec(config, *, rows: int, groups: int,
               patch_size: int) -> batch_lib.BatchSpec:
  """The static shapes of batches of `rows` rows in `groups` caption groups.

  Each group gets ceil(captions_per_row * rows per group) caption rows, at
  most one per slot, and with text packing ceil(text_rows_per_caption * C)
  text rows, at most C. In train mode, `image/parent` and `image/masked`
  when local crops and masks are on.
  """
  slots = config.images_per_row
  captions = None
  if config.captions_per_row is not None:
    rows_per_group = rows // groups
    captions = min(rows_per_group * slots,
                   math.ceil(config.captions_per_row * rows_per_group))
  text_rows = None
  if config.get('text_packing', False):
    per_group = captions or rows // groups * slots
    text_rows = min(per_group,
                    math.ceil(config.text_rows_per_caption * per_group))
  train = config.mode == 'train'
  local_crops = config.get('local_crops')
  return batch_lib.BatchSpec(
      rows=rows, tokens_per_row=config.tokens_per_row, slots=slots,
      text_len=config.text_len, patch_size=patch_size, groups=groups,
      captions_per_group=captions, patch_dtype=config.patch_dtype,
      text_rows=text_rows,
      local_crops=train and local_crops is not None and local_crops.count > 0,
      masks=train and config.get('mask_ratio', 0.0) > 0)


def _crop_budget(config, crops: crops_lib.CropConfig | None) -> int:
  """The most tokens an image's local crops take in its row."""
  return 0 if crops is None else crops.count * crops.max_tokens


def _check_config(config):
  """Raises ValueError naming the first bad `input` key."""
  def need(ok, key, value, what):
    if not ok:
      raise ValueError(f'input.{key} = {value!r}: {what}')

  need(config.mode in MODES, 'mode', config.mode, f'expected one of {MODES}')
  need(config.patch_dtype in batch_lib.PATCH_DTYPES, 'patch_dtype',
       config.patch_dtype, f'expected one of {batch_lib.PATCH_DTYPES}')
  need(config.tokens_per_row >= 1, 'tokens_per_row', config.tokens_per_row,
       'must be >= 1')
  need(config.images_per_row >= 1, 'images_per_row', config.images_per_row,
       'must be >= 1')
  need(config.text_len >= 1, 'text_len', config.text_len, 'must be >= 1')
  need(config.captions_per_row is None or config.captions_per_row > 0,
       'captions_per_row', config.captions_per_row, 'must be None or > 0')
  need(0 < config.text_rows_per_caption <= 1, 'text_rows_per_caption',
       config.text_rows_per_caption, 'must be in (0, 1]')
  sizes = tuple(config.patch_sizes)
  need(sizes and all(isinstance(p, int) and p >= 1 for p in sizes), 'patch_sizes',
       sizes, 'must be a non-empty tuple of positive ints')
  need(config.mode == 'train' or len(sizes) == 1, 'patch_sizes', sizes,
       'eval mode needs exactly one patch size')
  res = config.resolution
  need(res.mode in resolution.MODES, 'resolution.mode', res.mode,
       f'expected one of {resolution.MODES}')
  need(res.dist in resolution.DISTRIBUTIONS, 'resolution.dist', res.dist,
       f'expected one of {resolution.DISTRIBUTIONS}')
  need(0 < res.min <= res.max, 'resolution.min', (res.min, res.max),
       'need 0 < min <= max')
  need(res.max_tokens is None or 1 <= res.max_tokens <= config.tokens_per_row,
       'resolution.max_tokens', res.max_tokens,
       f'must be None or in 1..tokens_per_row ({config.tokens_per_row})')
  _check_crops_and_masks(config, need)
  drop = config.token_drop
  need(drop.kind in dropping.KINDS, 'token_drop.kind', drop.kind,
       f'expected one of {dropping.KINDS}')
  need(config.pack_buffer >= 1, 'pack_buffer', config.pack_buffer,
       'must be >= 1')
  need(config.workers >= 0, 'workers', config.workers, 'must be >= 0')
  need(config.worker_processes >= 0, 'worker_processes',
       config.worker_processes, 'must be >= 0')
  need(config.cycle_length >= 1, 'cycle_length', config.cycle_length,
       'must be >= 1')
  need(config.shuffle_buffer >= 0, 'shuffle_buffer', config.shuffle_buffer,
       'must be >= 0')
  need(config.read_retries >= 0, 'read_retries', config.read_retries,
       'must be >= 0')
  need(config.retry_delay >= 0, 'retry_delay', config.retry_delay,
       'must be >= 0')
  need(0 <= config.bad_record_budget < 1, 'bad_record_budget',
       config.bad_record_budget, 'must be in [0, 1)')
  need(config.bad_record_window >= 1, 'bad_record_window',
       config.bad_record_window, 'must be >= 1')


def _check_crops_and_masks(config, need):
  """`input.local_crops` and `input.mask_ratio`: valid values always, and in
  train mode an image with its crops fits a row."""
  crops = config.local_crops
  need(crops.count >= 0, 'local_crops.count', crops.count, 'must be >= 0')
  need(0 < crops.min_scale <= 1, 'local_crops.min_scale', crops.min_scale,
       'must be in (0, 1]')
  need(0 < crops.max_scale <= 1, 'local_crops.max_scale', crops.max_scale,
       'must be in (0, 1]')
  need(crops.min_scale <= crops.max_scale, 'local_crops.min_scale',
       (crops.min_scale, crops.max_scale), 'need min_scale <= max_scale')
  need(crops.max_tokens >= 1, 'local_crops.max_tokens', crops.max_tokens,
       'must be >= 1')
  need(0 <= config.mask_ratio < 1, 'mask_ratio', config.mask_ratio,
       'must be in [0, 1)')
  if config.mode != 'train' or crops.count == 0:
    return
  need(1 + crops.count <= config.images_per_row, 'local_crops.count',
       crops.count, f'an image and its crops need 1 + count slots of a row '
       f'(images_per_row = {config.images_per_row})')
  budget = crops.count * crops.max_tokens
  need(budget < config.tokens_per_row, 'local_crops.max_tokens',
       crops.max_tokens, f'count * max_tokens = {budget} leaves the image no '
       f'room in a row of {config.tokens_per_row} tokens')
  res_max = config.resolution.max_tokens
  need(res_max is None or res_max + budget <= config.tokens_per_row,
       'resolution.max_tokens', res_max,
       f'with its local crops ({budget} tokens at most) an image would not fit '
       f'a row of {config.tokens_per_row} tokens')
