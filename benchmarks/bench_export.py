"""Export throughput: packed rows versus one image per row (NaFlex-style).

  python benchmarks/bench_export.py                      # tiny model, CPU
  python benchmarks/bench_export.py --variant B/16 --num_images 2048

Both modes fit every image into the same --max_tokens budget at its native
aspect ratio, and push the same number of tokens per batch through the
same model; they differ only in how images fill the rows:

  packed  rows of --row_multiple x --max_tokens tokens, up to
          --images_per_row images each
  naflex  one image per row, padded to --max_tokens

Eval sizing ('fit') scales each image up or down to the largest grid within
the budget, so an image wastes only what its aspect ratio rounds off; that,
against the cost of attention over longer rows, is what packing trades.

Images are a folder of mixed-aspect JPEGs (--images, or synthetic ones
drawn at 1:4 to 4:1). Each mode runs the full export (read, decode, resize,
patchify, pack, embed, write parts) after a warm-up that compiles the model,
and reports images per second and the fraction of tokens that were padding.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax

from lit_navit import config as config_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import pipeline
from lit_navit.data import synthetic
from lit_navit.data import text as text_lib
from lit_navit.evaluate import datasets
from lit_navit.evaluate import embed
from lit_navit.evaluate import export
from lit_navit.models import two_towers


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', default=None,
                      help='a folder of images (default: synthetic ones)')
  parser.add_argument('--num_images', type=int, default=256,
                      help='synthetic images to draw')
  parser.add_argument('--variant', default='Ti/16', help='image tower size')
  parser.add_argument('--max_tokens', default='64,256',
                      help='token budget(s) per image, comma separated')
  parser.add_argument('--row_multiple', type=int, default=4,
                      help='packed rows hold this many budgets of tokens')
  parser.add_argument('--images_per_row', type=int, default=16,
                      help='slots per packed row')
  parser.add_argument('--tokens_per_batch', type=int, default=4096,
                      help='tokens per batch in both modes')
  parser.add_argument('--repeats', type=int, default=2,
                      help='timed exports per mode; the best is reported')
  parser.add_argument('--output', default=None, help='write results as JSON here')
  return parser.parse_args(argv)


def write_synthetic_images(folder, num_images):
  """Mixed-aspect synthetic JPEGs, sides 32..512, aspect up to 4:1."""
  source = synthetic.SyntheticSource(num_images, seed=0, split='all',
                                     min_side=32, max_side=512, max_aspect=4.0)
  for i in range(num_images):
    with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
      f.write(source[i].image)


def build_model(variant):
  """A randomly initialised two-tower model with the given image tower."""
  config = config_lib.default_config()
  config.model.image.variant = variant
  config.model.text.variant = 'mu'
  config.model.text.max_len = config.input.text_len
  model = two_towers.TwoTowers(config.model)
  spec = batch_lib.BatchSpec(rows=1, tokens_per_row=4, slots=1,
                             text_len=config.input.text_len,
                             patch_size=two_towers.base_patch_size(config.model.image))
  batch = {k: v for k, v in spec.empty().items() if k != 'index'}
  params = jax.jit(model.init)(jax.random.key(0), batch)['params']
  return config, model, params


def run_mode(name, max_tokens, config, model, params, tokenizer, source, args,
             workdir):
  """Best-of-repeats export throughput of one packing mode at one budget."""
  packed = name == 'packed'
  tokens_per_row = max_tokens * (args.row_multiple if packed else 1)
  embedder = embed.Embedder(
      model, params, config.input, tokenizer,
      batch_rows=max(1, args.tokens_per_batch // tokens_per_row),
      max_tokens=max_tokens, tokens_per_row=tokens_per_row,
      images_per_row=args.images_per_row if packed else 1)
  warmup = min(len(source), 2 * embedder.batch_rows)
  embedder.images(datasets.Subset(source, range(warmup)), progress=False)
  best = None
  for repeat in range(args.repeats):
    out = os.path.join(workdir, f'{name}_{max_tokens}_{repeat}')
    start = time.perf_counter()
    summary = export.export(embedder, source, out, part_size=len(source),
                            texts=False, key_column='image_path', progress=False)
    seconds = time.perf_counter() - start
    if best is None or seconds < best['seconds']:
      best = {'seconds': seconds, 'images_per_second': len(source) / seconds,
              'num_failed': summary['num_failed']}
  stats = padding_stats(embedder, source)
  return {'mode': name, 'max_tokens': max_tokens,
          'rows_per_batch': embedder.batch_rows,
          'tokens_per_row': embedder.input_config.tokens_per_row,
          'images_per_row': embedder.input_config.images_per_row, **best, **stats}


def padding_stats(embedder, source):
  """Batches and padding fraction of one eval pass in this mode."""
  with pipeline.Pipeline(source, embedder.tokenizer, embedder.input_config,
                         rows=embedder.batch_rows, seed=0) as batches:
    for _ in batches:
      pass
    stats = batches.stats
  return {'batches': stats['batches'],
          'padding_fraction': stats['padding_fraction'],
          'mean_images_per_row': stats['images_per_row']}


def main(argv=None):
  args = parse_args(argv)
  budgets = [int(b) for b in args.max_tokens.split(',')]
  with tempfile.TemporaryDirectory() as workdir:
    folder = args.images
    if folder is None:
      folder = os.path.join(workdir, 'images')
      os.makedirs(folder)
      write_synthetic_images(folder, args.num_images)
    source = datasets.ImageFiles(datasets.find_images(folder))
    config, model, params = build_model(args.variant)
    tokenizer = text_lib.Tokenizer(config.input.tokenizer, config.input.text_len,
                                   sticky_eos=config.input.sticky_eos)
    runs = [run_mode(name, max_tokens, config, model, params, tokenizer,
                     source, args, workdir)
            for max_tokens in budgets for name in ('packed', 'naflex')]
  results = {
      'variant': args.variant,
      'patch_size': two_towers.base_patch_size(config.model.image),
      'num_images': len(source), 'tokens_per_batch': args.tokens_per_batch,
      'row_multiple': args.row_multiple,
      'device': jax.devices()[0].device_kind, 'runs': runs,
  }
  print(f'{len(source)} images, {args.variant}, {args.tokens_per_batch} tokens '
        f'per batch, packed rows of {args.row_multiple}x the budget, '
        f'{results["device"]}')
  print(f'{"budget":>6} {"mode":8} {"img/s":>8} {"batches":>8} {"img/row":>8} '
        f'{"padding":>8}')
  for run in runs:
    print(f'{run["max_tokens"]:6d} {run["mode"]:8} {run["images_per_second"]:8.1f} '
          f'{run["batches"]:8d} {run["mean_images_per_row"]:8.2f} '
          f'{run["padding_fraction"]:8.1%}')
  for packed, naflex in zip(runs[::2], runs[1::2]):
    print(f'budget {packed["max_tokens"]}: packed / naflex '
          f'{packed["images_per_second"] / naflex["images_per_second"]:.2f}x')
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
