"""Input-pipeline throughput and packing efficiency in NaViT's setting.

Times decode -> sample -> patchify -> drop -> pack on synthetic JPEGs that
are encoded before timing starts (so drawing them is not timed), first one
stage at a time on one thread (images/s and tokens/s per core), then the
whole `Pipeline` with its thread pool. Also reports the padding fraction of
the packed batches against the baseline that puts one image per row, and,
for each `--captions-per-row`, the padding and the caption rows the text
tower encodes for no pair.

  python benchmarks/bench_pipeline.py            # a table
  python benchmarks/bench_pipeline.py --json     # the same figures as JSON
  python benchmarks/bench_pipeline.py --dist truncated_normal --max-side 384 \
      --captions-per-row 4 4.5 5       # the SigLIP recipe's resolution
"""

import argparse
import json
import os
import time

import numpy as np

from lit_navit.data import batch as batch_lib
from lit_navit.data import decode
from lit_navit.data import dropping
from lit_navit.data import packing
from lit_navit.data import patches as patches_lib
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import resolution
from lit_navit.data import synthetic
from lit_navit.data import text


class InMemorySource:
  """Records held as bytes, so reading them costs nothing."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


def navit_config(args):
  """NaViT's setting: side ~ U(64, 256), p = 16, L = 256, E = 16, no dropping."""
  config = pipeline_lib.default_config()
  config.tokens_per_row = args.tokens_per_row
  config.images_per_row = args.images_per_row
  config.patch_sizes = (args.patch_size,)
  config.resolution.update(mode='side', dist=args.dist, min=64,
                           max=args.max_side, mean=-0.5, std=1.0)
  config.token_drop.kind = 'none'
  config.pack_buffer = args.pack_buffer
  config.workers = args.workers
  return config


def timed(fn, items):
  """(seconds, results) of fn over items on this thread."""
  start = time.perf_counter()
  results = [fn(item) for item in items]
  return time.perf_counter() - start, results


def stage_figures(records, config, rows, tokenizer):
  """Single-thread rates of each stage over all records."""
  p = config.patch_sizes[0]
  length = config.tokens_per_row
  seconds = {}
  seconds['decode'], images = timed(
      lambda r: decode.decode_image(r.image, config.max_pixels), records)
  seconds['sample'], grids = timed(
      lambda i: resolution.sample_grid(
          np.random.default_rng([0, i]), *images[i].shape[:2], p,
          config.resolution, length), range(len(images)))
  seconds['resize+patchify'], patches = timed(
      lambda i: patches_lib.resize_and_patchify(images[i], grids[i], p),
      range(len(images)))

  def drop(i):
    num_tokens = len(patches[i])
    rate = dropping.drop_rate(config.token_drop, seed=0, index=i, step=0,
                              num_tokens=num_tokens, max_tokens=length)
    return dropping.drop_patches(patches[i], dropping.kept_count(num_tokens, rate),
                                 seed=0, index=i, step=0)
  seconds['drop'], patches = timed(drop, range(len(images)))

  captions = tokenizer.encode([r.caption for r in records])
  spec = batch_lib.BatchSpec(rows=rows, tokens_per_row=length,
                             slots=config.images_per_row,
                             text_len=config.text_len, patch_size=p)
  start = time.perf_counter()
  pending = list(range(len(patches)))
  while pending:
    buffer = pending[:config.pack_buffer]
    plan = packing.plan_rows([len(patches[i]) for i in buffer], rows, length,
                             config.images_per_row)
    chosen = [[buffer[k] for k in row] for row in plan]
    packing.pack_batch(
        [[packing.PackedImage(patches[i], captions[i], i) for i in row]
         for row in chosen], spec, tokenizer.pad_id)
    taken = {i for row in chosen for i in row}
    pending = [i for i in pending if i not in taken]
  seconds['pack'] = time.perf_counter() - start

  tokens = np.array([len(x) for x in patches])
  seconds['all stages'] = sum(seconds.values())
  stages = {name: {'images_per_s': len(records) / s,
                   'tokens_per_s': tokens.sum() / s}
            for name, s in seconds.items()}
  return stages, tokens


def pipeline_figures(source, tokenizer, config, rows, steps, warmup,
                     groups=1):
  """End-to-end rates and packing of `Pipeline` (thread pool included)."""
  images = tokens = 0
  with pipeline_lib.Pipeline(source, tokenizer, config, rows=rows,
                             seed=0, groups=groups) as pipe:
    for _ in range(warmup):
      next(pipe)
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(pipe)
      images += int(batch['valid'].sum())
      tokens += int(np.count_nonzero(batch['image/segment']))
    seconds = time.perf_counter() - start
    caption_rows = steps * batch['text/valid'].size
  return {'images_per_s': images / seconds, 'tokens_per_s': tokens / seconds,
          'padding_fraction': 1 - tokens / (steps * rows * config.tokens_per_row),
          'images_per_row': images / (steps * rows),
          'caption_rows_per_row': caption_rows / (steps * rows),
          'empty_caption_fraction': 1 - images / caption_rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=768,
                      help='synthetic JPEGs encoded up front')
  parser.add_argument('--rows', type=int, default=32, help='rows per batch (B)')
  parser.add_argument('--steps', type=int, default=24,
                      help='pipeline batches timed')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--patch-size', type=int, default=16)
  parser.add_argument('--tokens-per-row', type=int, default=256)
  parser.add_argument('--images-per-row', type=int, default=16)
  parser.add_argument('--pack-buffer', type=int, default=256)
  parser.add_argument('--dist', default='uniform',
                      choices=('uniform', 'truncated_normal'),
                      help='side distribution on [64, --max-side]')
  parser.add_argument('--max-side', type=int, default=256)
  parser.add_argument('--captions-per-row', type=float, nargs='*', default=(),
                      help='caption capacities to measure packing at')
  parser.add_argument('--groups', type=int, default=1,
                      help='caption groups (device shards) of the rows')
  parser.add_argument('--workers', type=int,
                      default=len(os.sched_getaffinity(0)))
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of a table')
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0))
  config = navit_config(args)
  tokenizer = text.Tokenizer(config.tokenizer, config.text_len)
  data = synthetic.SyntheticSource(args.images, seed=0)
  source = InMemorySource([data[i] for i in range(len(data))])

  stages, tokens = stage_figures(
      [source[i] for i in range(len(source))], config, args.rows, tokenizer)
  end_to_end = pipeline_figures(source, tokenizer, config, args.rows,
                                args.steps, args.warmup)
  captions = {}
  for value in args.captions_per_row:
    config.captions_per_row = value
    captions[value] = pipeline_figures(source, tokenizer, config, args.rows,
                                       args.steps, args.warmup, args.groups)
  config.captions_per_row = None
  side = f'{args.dist}(64, {args.max_side})'
  result = {
      'captions': captions,
      'setting': {'side': side, 'patch_size': args.patch_size,
                  'tokens_per_row': args.tokens_per_row,
                  'images_per_row': args.images_per_row, 'rows': args.rows,
                  'pack_buffer': args.pack_buffer, 'workers': args.workers,
                  'cores': cores, 'images': args.images},
      'stages_per_core': stages,
      'pipeline': end_to_end,
      'pipeline_per_core': {
          'images_per_s': end_to_end['images_per_s'] / cores,
          'tokens_per_s': end_to_end['tokens_per_s'] / cores},
      'mean_tokens_per_image': float(tokens.mean()),
      'padding_fraction': end_to_end['padding_fraction'],
      'padding_fraction_one_image_per_row': 1 - float(tokens.mean()) / args.tokens_per_row,
  }
  if args.json:
    print(json.dumps(result))
    return
  print(f"NaViT setting: side ~ {side}, p={args.patch_size}, "
        f"L={args.tokens_per_row}, E={args.images_per_row}, B={args.rows}, "
        f"no dropping; {args.images} synthetic JPEGs; {cores} cores, "
        f"{args.workers} workers")
  print(f"{'stage':<28}{'images/s':>12}{'tokens/s':>14}")
  for name, figures in stages.items():
    print(f"{name + ' (1 thread)':<28}{figures['images_per_s']:>12.0f}"
          f"{figures['tokens_per_s']:>14.0f}")
  for name, figures in (('pipeline (all cores)', end_to_end),
                        ('pipeline per core', result['pipeline_per_core'])):
    print(f"{name:<28}{figures['images_per_s']:>12.0f}"
          f"{figures['tokens_per_s']:>14.0f}")
  print(f"mean tokens per image       {result['mean_tokens_per_image']:.1f}")
  print(f"images per row              {end_to_end['images_per_row']:.2f}")
  print(f"padding fraction, packed    {result['padding_fraction']:.4f}")
  print(f"padding, one image per row  "
        f"{result['padding_fraction_one_image_per_row']:.4f}")
  if captions:
    print(f"\ncaption rows ({args.groups} groups of {args.rows // args.groups} rows)")
    print(f"{'captions/row':>12}{'images/row':>12}{'padding':>10}"
          f"{'empty captions':>16}")
    print(f"{'one per slot':>12}{end_to_end['images_per_row']:>12.2f}"
          f"{end_to_end['padding_fraction']:>10.4f}"
          f"{end_to_end['empty_caption_fraction']:>16.4f}")
    for value, figures in captions.items():
      print(f"{value:>12}{figures['images_per_row']:>12.2f}"
            f"{figures['padding_fraction']:>10.4f}"
            f"{figures['empty_caption_fraction']:>16.4f}")


if __name__ == '__main__':
  main()
