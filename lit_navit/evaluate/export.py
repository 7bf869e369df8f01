"""Embedding export in the layout clip-retrieval writes and autofaiss reads.

  OUT/img_emb/img_emb_{N}.npy        float16 or float32 [n, D], unit rows
  OUT/text_emb/text_emb_{N}.npy      the same for captions (when exported)
  OUT/metadata/metadata_{N}.parquet  one row per embedding row: the image
                                     path or key, the caption, source index
                                     and what identifies the record (below)
  OUT/failed/failed_{N}.jsonl        images of part N that did not decode
  OUT/failed.jsonl                   all of them, merged at the end
  OUT/export.json                    the settings, checked on rerun

Each run exports the records of the source that the folder does not hold
yet, in source order, in new parts of `part_size` records numbered after the
existing ones; a rerun after an interruption therefore redoes exactly the
unfinished part, and a folder of images that grew gets only its new images
embedded. A record is identified by its file's path, size and mtime when the
source reads image files, and by its source index otherwise (TFRecord, tar
and synthetic sources, which do not grow). Settings that change embeddings
(checkpoint, patch size, budget, resize, dtype...) must match the folder's
export.json, or the run stops and asks for a new folder. A non-empty folder
without export.json is not ours and is refused: nothing in it is touched.

The index holds exactly one row per current record: a part holding rows (or
failures) of records the source no longer has (a file deleted, or changed:
its new version is embedded again) is rewritten without them, as a new part
whose metadata names the part it replaces (`replaces` in the parquet schema
metadata); the old part is then removed, its metadata first. A run
interrupted in between finds the replacement and finishes the removal.

N is zero-padded to the width of the first run's part count, so that name
order is part order; parts appended later may be wider (read parts in
numeric order, as `query` does). Every file is written to a temporary name
and renamed, so it is complete or absent; the metadata file goes last and
marks its part done (files of a part without it are removed and redone).

Paths are kept exactly. The `image_path` column is text (invalid UTF-8 in a
file name shows as U+FFFD there); `path_bytes` holds the name's exact bytes
(`os.fsdecode` gives the path back). In failed.jsonl a path is a JSON string
in which each undecodable byte is a lone surrogate escape (\\udcXX, Python's
'surrogateescape'): `json.loads` then `os.fsencode` gives the exact bytes.
"""

import hashlib
import heapq
import json
import os
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lit_navit import fs
from lit_navit import sharding

MANIFEST = 'export.json'
DTYPES = ('float16', 'float32')


class _Part:
  """Some records of a source (by index) that remembers each record's key
  and caption as the pipeline reads it, so nothing is read twice."""

  def __init__(self, source, indices):
    self._source, self.indices = source, indices
    self.keys, self.captions = {}, {}

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records')
    record = self._source[self.indices[index]]
    self.keys[index], self.captions[index] = record.key, record.caption
    return record

  def gather(self):
    """Adds the keys and captions that the other processes read."""
    if jax.process_count() == 1:
      return
    rows = [[i, self.keys[i], self.captions[i]] for i in self.keys]
    for host_rows in sharding.gather_from_processes(rows):
      for i, key, caption in host_rows:
        self.keys[i], self.captions[i] = key, caption


def _identities(source):
  """What marks each record of `source` as done: (path bytes, size,
  mtime_ns) for image files, the source index otherwise."""
  # Shard sources have `paths` too, one per file: only per-record image
  # files identify records.
  paths = getattr(source, 'image_paths', None)
  if paths is None:
    return list(range(len(source)))
  identities = []
  for path in paths:
    try:
      size, mtime_ns = fs.stat(path)
      identities.append((os.fsencode(path), size, mtime_ns))
    except OSError:  # a missing file fails again until it appears
      identities.append((os.fsencode(path), -1, -1))
  return identities


def _identity_columns(identities):
  if identities and isinstance(identities[0], tuple):
    paths, sizes, mtimes = zip(*identities)
    return {'path_bytes': pa.array(paths, pa.binary()),
            'size': pa.array(sizes, pa.int64()),
            'mtime_ns': pa.array(mtimes, pa.int64())}
  return {}


def _done_identities(metadata, failed, by_file):
  """The identities of one finished part's rows and failures."""
  if by_file:
    table = _read_table(metadata, columns=['path_bytes', 'size', 'mtime_ns'])
    done = set(zip(*(table.column(c).to_pylist() for c in table.column_names)))
  else:
    done = set(_read_table(metadata, columns=['index']).column('index').to_pylist())
  with fs.open(failed, 'r', encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      done.add((os.fsencode(row['key']), row['size'], row['mtime_ns'])
               if by_file else row['index'])
  return done


def _part_numbers(output_dir):
  """{part number: its file-name form} of finished parts (metadata written);
  the files of unfinished ones are removed."""
  numbers, finished = {}, set()
  for kind in ('metadata', 'img_emb', 'text_emb', 'failed'):
    folder = fs.join(output_dir, kind)
    for name in fs.listdir(folder):
      stem, dot, _ = name.partition('.')
      number = stem.rpartition('_')[2]
      if dot and number.isdigit() and '.tmp-' not in name:
        numbers.setdefault(int(number), set()).add(fs.join(folder, name))
        if kind == 'metadata':
          finished.add(number)
  parts = {}
  for number, files in numbers.items():
    names = {n for n in finished if int(n) == number}
    if names:
      parts[number] = names.pop()
    else:
      for path in files:  # an interrupted part: redone from scratch
        fs.remove(path)
  return parts


def _paths(output_dir, number, width):
  """Part `number`'s files (`number` may be its file-name form already)."""
  name = str(number).zfill(width)
  return {
      'img': fs.join(output_dir, 'img_emb', f'img_emb_{name}.npy'),
      'text': fs.join(output_dir, 'text_emb', f'text_emb_{name}.npy'),
      'metadata': fs.join(output_dir, 'metadata', f'metadata_{name}.parquet'),
      'failed': fs.join(output_dir, 'failed', f'failed_{name}.jsonl'),
  }


def _atomic_write(path, write, mode='wb'):
  """Calls write(file); the file appears at `path` whole or not at all."""
  try:
    fs.makedirs(fs.dirname(path))
    with fs.atomic_write(path, mode) as f:
      write(f)
  except OSError as e:  # e.g. a full disk: name the file being written
    raise OSError(e.errno, e.strerror or str(e), path) from e


def _save_npy(path, array):
  _atomic_write(path, lambda f: np.save(f, array))


def _save_jsonl(path, rows):
  _atomic_write(path, lambda f: f.writelines(json.dumps(row) + '\n' for row in rows),
                mode='w')


def _read_table(path, **kwargs):
  with fs.open(path, 'rb') as f:
    return pq.read_table(f, **kwargs)


def _load_npy(path):
  """An exported array: memory-mapped when local, read whole from a URL."""
  if not fs.is_remote(path):
    return np.load(path, mmap_mode='r', allow_pickle=False)
  with fs.open(path, 'rb') as f:
    return np.load(f, allow_pickle=False)


def params_fingerprint(params):
  """A short hash of a parameter tree's values, so a rerun with other
  weights cannot mix its parts with an earlier export's."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def _check_manifest(output_dir, settings):
  """Checks the settings against an earlier run's; returns the manifest."""
  path = fs.join(output_dir, MANIFEST)
  if not fs.exists(path):
    return None
  earlier = json.loads(fs.read_text(path))
  changed = {k: (earlier.get(k), v) for k, v in settings.items()
             if earlier.get(k) != v}
  if changed:
    raise ValueError(f'{output_dir} holds an export with other settings '
                     f'(earlier, now): {changed}; use a new output folder')
  return earlier


def _write_manifest(output_dir, manifest):
  _atomic_write(fs.join(output_dir, MANIFEST),
                lambda f: json.dump(manifest, f, indent=2), mode='w')


def export(embedder, source, output_dir, *, part_size=100_000, dtype='float16',
           texts=False, key_column='key', progress=True, checkpoint=''):
  """Exports the embeddings of the images (and captions) of `source` that
  `output_dir` does not hold yet.

  Args:
    embedder: an `embed.Embedder`.
    source: random-access records (`sources.Source`); one with `paths` (image
      files) is keyed by file, so a folder that grows is exported
      incrementally.
    output_dir: the export folder (see the module doc).
    part_size: records per new part.
    dtype: 'float16' or 'float32' for the saved embeddings.
    texts: also embed each record's caption into text_emb/.
    key_column: the metadata column of each record's key: 'image_path' for
      files (as clip-retrieval names it), 'key' otherwise.
    progress: show progress bars.
    checkpoint: where the weights came from, recorded in export.json (the
      weights themselves are checked by their hash, params_sha256).

  Returns:
    A summary: images in the source, in the folder (exported and failed),
    new this run, rows dropped (records gone or changed), parts written and
    already there, and the seconds and images per second of this run.

  Raises:
    ValueError: `output_dir` holds an export with other settings.
    FileExistsError: `output_dir` is not empty and holds no export.
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  if part_size < 1:
    raise ValueError(f'part_size must be >= 1, got {part_size}')
  # Only process 0 reads and writes the folder; every process embeds its
  # share of each part (see `embed.Embedder.images`).
  identities = _identities(source) if jax.process_index() == 0 else None
  settings = {
      'part_size': part_size, 'dtype': dtype, 'texts': texts,
      'key_column': key_column, 'dim': embedder.dim,
      'patch_size': embedder.patch_size, 'max_tokens': embedder.max_tokens,
      'resize': embedder.resize, 'params_sha256': params_fingerprint(embedder.params),
  }
  # Facts that may change between runs, recorded but not checked.
  facts = {'num_images': len(source), 'checkpoint': checkpoint}
  plan = sharding.run_on_process_0(
      lambda: _plan(output_dir, settings, facts, identities, part_size))
  todo, first, width = plan['todo'], plan['first'], plan['width']
  new_parts = -(-len(todo) // part_size)
  start_time = time.perf_counter()
  for n in range(new_parts):
    indices = todo[n * part_size:(n + 1) * part_size]
    part = _Part(source, indices)
    emb, failed = embedder.images(part, progress=progress)
    part.gather()
    sharding.run_on_process_0(lambda: _write_part(
        embedder, part, emb, failed, [identities[i] for i in indices],
        _paths(output_dir, first + n, width), dtype, texts, key_column))

  def finish():
    exported, failed_total = _merge_failed(output_dir)
    if plan['manifest']:
      _write_manifest(output_dir, plan['manifest'])
    return exported, failed_total

  exported, failed_total = sharding.run_on_process_0(finish)
  seconds = time.perf_counter() - start_time
  return {
      'num_images': len(source),
      'num_exported': exported,
      'num_failed': failed_total,
      'num_new': len(todo),
      'num_dropped': plan['dropped'],
      'parts_written': new_parts,
      'parts_skipped': plan['parts_skipped'],
      'seconds': seconds,
      'images_per_second': len(todo) / seconds if todo else 0.0,
  }


def _plan(output_dir, settings, facts, identities, part_size):
  """Checks the folder's settings and lists the records it lacks.

  Returns:
    {'todo': source indices to embed, 'first': the first new part's number,
    'width': its digits, 'dropped': rows and failures of records gone,
    'parts_skipped': parts already there, 'manifest': the export.json to
    write at the end, or None}.
  """
  by_file = bool(identities) and isinstance(identities[0], tuple)
  settings = {**settings, 'records_by': 'file' if by_file else 'index'}
  earlier = _check_manifest(output_dir, settings)
  if earlier is None and fs.listdir(output_dir):
    raise FileExistsError(
        f'output folder {output_dir} is not empty and holds no export of ours '
        f'({MANIFEST} is missing); nothing was written: choose an empty or new folder')
  manifest = {**settings, **facts}
  if earlier is None:  # first: an interrupted first run keeps its settings
    _write_manifest(output_dir, manifest)
  parts = _finish_replacements(output_dir, _part_numbers(output_dir))
  current = set(identities)
  done, dropped = set(), 0
  for number, name in sorted(parts.items()):
    files = _paths(output_dir, name, 0)
    held = _done_identities(files['metadata'], files['failed'], by_file)
    if not held <= current:
      dropped += len(held - current)
      _replace_part(output_dir, name, current, by_file,
                    max(parts) + 1, max(len(n) for n in parts.values()))
      parts = _part_numbers(output_dir)
    done |= held & current
  todo = [i for i, identity in enumerate(identities) if identity not in done]
  first = max(parts, default=-1) + 1
  new_parts = -(-len(todo) // part_size)
  width = max([len(n) for n in parts.values()] +
              [len(str(max(first + new_parts - 1, 0)))])
  changed = earlier is not None and earlier != manifest
  return {'todo': todo, 'first': first, 'width': width, 'dropped': dropped,
          'parts_skipped': len(parts), 'manifest': manifest if changed else None}


REPLACES = b'lit_navit.replaces'  # parquet schema metadata: the part replaced


def _remove_part(output_dir, name):
  """Removes a finished part, its metadata first (so that an interrupted
  removal leaves an unfinished part, which the next run clears)."""
  files = _paths(output_dir, name, 0)
  for kind in ('metadata', 'img', 'text', 'failed'):
    if fs.exists(files[kind]):
      fs.remove(files[kind])


def _finish_replacements(output_dir, parts):
  """Removes the parts that a finished replacement names (a run stopped
  between writing the replacement and removing the old part)."""
  for name in list(parts.values()):
    with fs.open(_paths(output_dir, name, 0)['metadata'], 'rb') as f:
      replaced = (pq.read_schema(f).metadata or {}).get(REPLACES)
    if replaced is not None and int(replaced) in parts:
      _remove_part(output_dir, parts.pop(int(replaced)))
  return parts


def _replace_part(output_dir, name, current, by_file, number, width):
  """Rewrites part `name` without the rows and failures of records not in
  `current`, as part `number`, then removes it."""
  old = _paths(output_dir, name, 0)
  table = _read_table(old['metadata'])
  if by_file:
    held = zip(*(table.column(c).to_pylist() for c in ('path_bytes', 'size', 'mtime_ns')))
  else:
    held = table.column('index').to_pylist()
  keep = [row for row, identity in enumerate(held) if identity in current]
  with fs.open(old['failed'], 'r', encoding='utf-8') as f:
    failed = [json.loads(line) for line in f]
  failed = [row for row in failed
            if ((os.fsencode(row['key']), row['size'], row['mtime_ns'])
                if by_file else row['index']) in current]
  if keep or failed:
    new = _paths(output_dir, number, width)
    _save_npy(new['img'], np.asarray(_load_npy(old['img']))[keep])
    if fs.exists(old['text']):
      _save_npy(new['text'], np.asarray(_load_npy(old['text']))[keep])
    _save_jsonl(new['failed'], failed)
    kept = table.take(keep)
    kept = kept.replace_schema_metadata(
        {**(kept.schema.metadata or {}), REPLACES: str(int(name)).encode()})
    _atomic_write(new['metadata'], lambda f: pq.write_table(kept, f))
  _remove_part(output_dir, name)


def _write_part(embedder, part, emb, failed, identities, paths, dtype, texts,
                key_column):
  """Writes one part's files, its metadata last (which marks it done)."""
  failed_rows = {index for index, _, _ in failed}
  kept = [i for i in range(len(part)) if i not in failed_rows]
  columns = {key_column: [_text(part.keys[i]) for i in kept]}
  if texts:
    columns['caption'] = [part.captions[i] for i in kept]
  columns['index'] = [part.indices[i] for i in kept]
  columns.update(_identity_columns([identities[i] for i in kept]))
  # Built before anything is written, so a key that cannot be stored stops
  # the run with nothing of the part on disk.
  table = pa.table(columns)
  failed_rows = [{'index': part.indices[i], 'key': key, 'reason': reason}
                 for i, key, reason in failed]
  if identities and isinstance(identities[0], tuple):
    for row, (i, _, _) in zip(failed_rows, failed):
      row['key'] = os.fsdecode(identities[i][0])
      row['size'], row['mtime_ns'] = identities[i][1:]
  _save_npy(paths['img'], emb[kept].astype(dtype))
  if texts:
    _save_npy(paths['text'], embedder.texts(columns['caption']).astype(dtype))
  _save_jsonl(paths['failed'], failed_rows)
  _atomic_write(paths['metadata'], lambda f: pq.write_table(table, f))


def _text(key):
  """A key as valid UTF-8 text: a file name's undecodable bytes (surrogate
  escapes) become U+FFFD; the exact bytes are kept in path_bytes."""
  if isinstance(key, str):
    return os.fsencode(key).decode('utf-8', 'replace') if _has_surrogates(key) else key
  return key


def _has_surrogates(text):
  try:
    text.encode('utf-8')
    return False
  except UnicodeEncodeError:
    return True


def _merge_failed(output_dir):
  """Rewrites failed.jsonl from the parts' lists; returns (rows in the
  index, failures)."""
  rows, exported = [], 0
  for name in sorted(_part_numbers(output_dir).values(), key=int):
    paths = _paths(output_dir, name, 0)
    with fs.open(paths['metadata'], 'rb') as f:
      exported += pq.read_metadata(f).num_rows
    with fs.open(paths['failed'], 'r', encoding='utf-8') as f:
      rows.extend(json.loads(line) for line in f)
  _save_jsonl(fs.join(output_dir, 'failed.jsonl'), rows)
  return exported, len(rows)


def _part_files(output_dir, kind):
  folder = fs.join(output_dir, f'{kind}_emb')
  if not fs.isdir(folder):
    raise FileNotFoundError(f'no exported {kind} embeddings in {output_dir} '
                            f'({folder} is missing)')
  files = []
  names = [n for n in fs.listdir(folder) if n.endswith('.npy')]
  for name in sorted(names, key=lambda n: int(n[len(f'{kind}_emb_'):-len('.npy')])):
    number = name[len(f'{kind}_emb_'):-len('.npy')]
    metadata = fs.join(output_dir, 'metadata', f'metadata_{number}.parquet')
    if not fs.exists(metadata):
      raise FileNotFoundError(f'{metadata} is missing: part {number} is '
                              'unfinished; rerun the export to complete it')
    files.append((fs.join(folder, name), metadata))
  return files


def query(output_dir, vectors, k=10, kind='img'):
  """Brute-force nearest neighbours among exported embeddings.

  Args:
    output_dir: an export folder.
    vectors: float [D] or [Q, D] query embeddings (unit norm for cosine).
    k: neighbours per query.
    kind: 'img' (search images) or 'text' (search captions).

  Returns:
    For each query (a single list for a [D] query), up to k dicts, best
    first: 'score', and that row's metadata (image path or key, caption,
    index). Ties go to the earlier part and row.
  """
  single = np.ndim(vectors) == 1
  queries = np.atleast_2d(np.asarray(vectors, np.float32))
  # Per query, a heap of (score, -part, -row): the smallest is the worst.
  heaps = [[] for _ in queries]
  files = _part_files(output_dir, kind)
  for part, (emb_path, _) in enumerate(files):
    emb = _load_npy(emb_path)
    if not len(emb):
      continue
    scores = queries @ np.asarray(emb, np.float32).T
    for q, row_scores in enumerate(scores):
      top = np.argsort(-row_scores, kind='stable')[:k]
      for row in top:
        item = (float(row_scores[row]), -part, -int(row))
        if len(heaps[q]) < k:
          heapq.heappush(heaps[q], item)
        elif item > heaps[q][0]:
          heapq.heapreplace(heaps[q], item)
  tables = {}
  results = []
  for heap in heaps:
    hits = []
    for score, neg_part, neg_row in sorted(heap, reverse=True):
      part, row = -neg_part, -neg_row
      if part not in tables:
        tables[part] = _read_table(files[part][1]).to_pylist()
      hits.append({'score': score, **tables[part][row]})
    results.append(hits)
  return results[0] if single else results
