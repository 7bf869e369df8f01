"""Embedding export in the layout clip-retrieval writes and autofaiss reads.

  OUT/img_emb/img_emb_{N}.npy        float16 or float32 [n, D], unit rows
  OUT/text_emb/text_emb_{N}.npy      the same for captions (when exported)
  OUT/metadata/metadata_{N}.parquet  one row per embedding row: the image
                                     path or key, the caption, source index
  OUT/failed/failed_{N}.jsonl        images of part N that did not decode
  OUT/failed.jsonl                   all of them, merged at the end
  OUT/export.json                    the settings, checked on rerun

Part N covers source indices [N * part_size, (N + 1) * part_size); its files
hold only the images that decoded, in source order. N is zero-padded so that
name order is part order. Every file is written to a temporary name and
renamed, so it is complete or absent; the metadata file goes last and marks
its part done. A rerun skips finished parts and redoes the rest.
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

MANIFEST = 'export.json'
DTYPES = ('float16', 'float32')


class _Part:
  """A window [start, stop) of a source that remembers each record's key and
  caption as the pipeline reads it, so nothing is read twice."""

  def __init__(self, source, start, stop):
    self._source, self.start, self.stop = source, start, stop
    self.keys, self.captions = {}, {}

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records')
    record = self._source[self.start + index]
    self.keys[index], self.captions[index] = record.key, record.caption
    return record


def _paths(output_dir, number, width):
  name = str(number).zfill(width)
  return {
      'img': os.path.join(output_dir, 'img_emb', f'img_emb_{name}.npy'),
      'text': os.path.join(output_dir, 'text_emb', f'text_emb_{name}.npy'),
      'metadata': os.path.join(output_dir, 'metadata', f'metadata_{name}.parquet'),
      'failed': os.path.join(output_dir, 'failed', f'failed_{name}.jsonl'),
  }


def _atomic_write(path, write):
  """Calls write(tmp_path), then renames tmp_path to path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _save_npy(path, array):
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.save(f, array)
  _atomic_write(path, write)


def _save_jsonl(path, rows):
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
  _atomic_write(path, write)


def params_fingerprint(params):
  """A short hash of a parameter tree's values, so a rerun with other
  weights cannot mix its parts with an earlier export's."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def _check_manifest(output_dir, settings):
  """Writes the settings, or checks them against an earlier run's."""
  path = os.path.join(output_dir, MANIFEST)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      earlier = json.load(f)
    changed = {k: (earlier.get(k), v) for k, v in settings.items()
               if earlier.get(k) != v}
    if changed:
      raise ValueError(f'{output_dir} holds an export with other settings '
                       f'(earlier, now): {changed}; use a new output folder')
    return

  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(settings, f, indent=2)
  _atomic_write(path, write)


def export(embedder, source, output_dir, *, part_size=100_000, dtype='float16',
           texts=False, key_column='key', progress=True):
  """Exports the embeddings of every image (and caption) of `source`.

  Args:
    embedder: an `embed.Embedder`.
    source: random-access records (`sources.Source`).
    output_dir: the export folder (see the module doc).
    part_size: source indices per part.
    dtype: 'float16' or 'float32' for the saved embeddings.
    texts: also embed each record's caption into text_emb/.
    key_column: the metadata column of each record's key: 'image_path' for
      files (as clip-retrieval names it), 'key' otherwise.
    progress: show progress bars.

  Returns:
    A summary: images in the source, exported, failed, parts written and
    skipped, and the seconds and images per second of this run.

  Raises:
    ValueError: `output_dir` holds an export with other settings.
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  if part_size < 1:
    raise ValueError(f'part_size must be >= 1, got {part_size}')
  num_parts = -(-len(source) // part_size)
  width = len(str(max(num_parts - 1, 0)))
  _check_manifest(output_dir, {
      'num_images': len(source), 'part_size': part_size, 'dtype': dtype,
      'texts': texts, 'key_column': key_column, 'dim': embedder.dim,
      'patch_size': embedder.patch_size, 'max_tokens': embedder.max_tokens,
      'resize': embedder.resize, 'params_sha256': params_fingerprint(embedder.params)})
  start_time = time.perf_counter()
  written = skipped = embedded = 0
  for number in range(num_parts):
    paths = _paths(output_dir, number, width)
    if _is_complete(paths, texts):
      skipped += 1
      continue
    part = _Part(source, number * part_size,
                 min((number + 1) * part_size, len(source)))
    emb, failed = embedder.images(part, progress=progress)
    embedded += len(part)
    _write_part(embedder, part, emb, failed, paths, dtype, texts, key_column)
    written += 1
  failed_total = _merge_failed(output_dir, num_parts, width)
  seconds = time.perf_counter() - start_time
  return {
      'num_images': len(source),
      'num_exported': len(source) - failed_total,
      'num_failed': failed_total,
      'parts_written': written,
      'parts_skipped': skipped,
      'seconds': seconds,
      'images_per_second': embedded / seconds if embedded else 0.0,
  }


def _is_complete(paths, texts):
  needed = ['img', 'metadata', 'failed'] + (['text'] if texts else [])
  return all(os.path.exists(paths[k]) for k in needed)


def _write_part(embedder, part, emb, failed, paths, dtype, texts, key_column):
  failed_rows = {index for index, _, _ in failed}
  kept = [i for i in range(len(part)) if i not in failed_rows]
  columns = {key_column: [part.keys[i] for i in kept]}
  if texts:
    columns['caption'] = [part.captions[i] for i in kept]
  columns['index'] = [part.start + i for i in kept]
  _save_npy(paths['img'], emb[kept].astype(dtype))
  if texts:
    _save_npy(paths['text'], embedder.texts(columns['caption']).astype(dtype))
  _save_jsonl(paths['failed'], [
      {'index': part.start + i, 'key': key, 'reason': reason}
      for i, key, reason in failed])
  table = pa.table(columns)
  _atomic_write(paths['metadata'], lambda tmp: pq.write_table(table, tmp))


def _merge_failed(output_dir, num_parts, width):
  """Rewrites failed.jsonl from the parts' lists; returns the count."""
  rows = []
  for number in range(num_parts):
    with open(_paths(output_dir, number, width)['failed'], encoding='utf-8') as f:
      rows.extend(json.loads(line) for line in f)
  _save_jsonl(os.path.join(output_dir, 'failed.jsonl'), rows)
  return len(rows)


def _part_files(output_dir, kind):
  folder = os.path.join(output_dir, f'{kind}_emb')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'no exported {kind} embeddings in {output_dir} '
                            f'({folder} is missing)')
  files = []
  for name in sorted(n for n in os.listdir(folder) if n.endswith('.npy')):
    number = name[len(f'{kind}_emb_'):-len('.npy')]
    metadata = os.path.join(output_dir, 'metadata', f'metadata_{number}.parquet')
    if not os.path.exists(metadata):
      raise FileNotFoundError(f'{metadata} is missing: part {number} is '
                              'unfinished; rerun the export to complete it')
    files.append((os.path.join(folder, name), metadata))
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
    emb = np.load(emb_path, mmap_mode='r')
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
        tables[part] = pq.read_table(files[part][1]).to_pylist()
      hits.append({'score': score, **tables[part][row]})
    results.append(hits)
  return results[0] if single else results
