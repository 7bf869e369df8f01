"""Export throughput: 'native' packed rows against one image per row.

  python benchmarks/bench_export.py                      # tiny model, CPU
  python benchmarks/bench_export.py --variant B/16 --num_images 2048 --json

Every run embeds the same images within the same --max_tokens budget at
their native aspect ratio, and pushes the same number of tokens per batch
(--tokens_per_batch) through the same model. Runs differ in how an image is
sized (`resize`, see lit_navit/data/resolution.py) and how rows are filled:

  native/packed  own size (shrunk only to fit the budget), rows of
                 --row_multiple budgets of tokens, up to --images_per_row
                 images each: NaViT.
  native/single  own size, one image per row padded to the budget: what a
                 framework without packing does with the same images.
  fit/single     scaled up or down to fill the budget, one per row: SigLIP 2
                 NaFlex, the zero-shot default.
  fit/packed     fit images in native/packed's rows: images of ~the budget
                 rarely share a row, so longer rows only add attention.

Images are a folder (--images) or synthetic JPEGs (sides 32..512, log-uniform
shorter side, aspect up to 4:1). Each run does the full export (read,
decode, resize, patchify, pack, embed, write parts) after a warm-up that
compiles the model; repeats go round the runs in turn, so that drift on a
shared machine hits them alike, and the best is kept. A Markdown table goes
to stdout (or, with --json, the results as JSON).
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

RUNS = ('native/packed', 'native/single', 'fit/single', 'fit/packed')
BASELINE = 'fit/single'  # Ratios are against this run at the same budget.


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', default=None,
                      help='a folder of images (default: synthetic ones)')
  parser.add_argument('--num_images', type=int, default=256,
                      help='synthetic images to draw')
  parser.add_argument('--variant', default='Ti/16', help='image tower size')
  parser.add_argument('--max_tokens', default='256',
                      help='token budget(s) per image, comma separated')
  parser.add_argument('--runs', default='native/packed,native/single,fit/single',
                      help=f'comma list of resize/layout runs from {RUNS}')
  parser.add_argument('--row_multiple', default='1',
                      help='packed rows hold this many budgets of tokens; '
                      'a comma list runs each')
  parser.add_argument('--images_per_row', type=int,
                      default=embed.NATIVE_IMAGES_PER_ROW,
                      help='slots per packed row')
  parser.add_argument('--tokens_per_batch', type=int, default=4096,
                      help='tokens per batch in every run')
  parser.add_argument('--repeats', type=int, default=2,
                      help='timed exports per run; the best is reported')
  parser.add_argument('--json', action='store_true',
                      help='print the results as JSON instead of a table')
  parser.add_argument('--output', default=None, help='also write the JSON here')
  return parser.parse_args(argv)


def write_synthetic_images(folder, num_images):
  """Mixed-size, mixed-aspect synthetic JPEGs: sides 32..512, aspect <= 4:1."""
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


def plan_runs(args, budgets):
  """[(run name, budget, row multiple)]: packed runs once per multiple."""
  names = [n.strip() for n in args.runs.split(',') if n.strip()]
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    raise ValueError(f'--runs: unknown {unknown}; expected some of {RUNS}')
  multiples = [int(m) for m in args.row_multiple.split(',')]
  return [(name, budget, multiple)
          for budget in budgets for name in names
          for multiple in (multiples if name.endswith('/packed') else [1])]


def make_embedder(run, model, params, config, tokenizer, args):
  """The Embedder of one (name, budget, multiple) run."""
  name, budget, multiple = run
  resize, layout = name.split('/')
  tokens_per_row = budget * multiple
  return embed.Embedder(
      model, params, config.input, tokenizer, resize=resize,
      batch_rows=max(1, args.tokens_per_batch // tokens_per_row),
      max_tokens=budget, tokens_per_row=tokens_per_row,
      images_per_row=args.images_per_row if layout == 'packed' else 1)


def warm_up(embedder, source):
  """Compiles the model on a few batches."""
  warmup = min(len(source), 2 * embedder.batch_rows)
  embedder.images(datasets.Subset(source, range(warmup)), progress=False)


def time_export(embedder, source, out):
  """Seconds of one full export of `source` into `out`."""
  start = time.perf_counter()
  summary = export.export(embedder, source, out, part_size=len(source),
                          texts=False, key_column='image_path', progress=False)
  if summary['num_failed']:
    raise RuntimeError(f'{summary["num_failed"]} images failed to export')
  return time.perf_counter() - start


def padding_stats(embedder, source):
  """Batches, padding and tokens per image of one eval pass (no model)."""
  config = embedder.input_config
  with pipeline.Pipeline(source, embedder.tokenizer, config,
                         rows=embedder.batch_rows, seed=0) as batches:
    for _ in batches:
      pass
    stats = batches.stats
  tokens = stats['batches'] * embedder.batch_rows * config.tokens_per_row
  real = (1 - stats['padding_fraction']) * tokens
  return {'batches': stats['batches'],
          'padding_fraction': stats['padding_fraction'],
          'mean_images_per_row': stats['images_per_row'],
          'tokens_per_image': real / max(1, stats['images'])}


def benchmark(args, source, workdir):
  """Results of every planned run; repeats interleaved across runs."""
  config, model, params = build_model(args.variant)
  tokenizer = text_lib.Tokenizer(config.input.tokenizer, config.input.text_len,
                                 sticky_eos=config.input.sticky_eos)
  budgets = [int(b) for b in args.max_tokens.split(',')]
  runs = plan_runs(args, budgets)
  embedders = [make_embedder(run, model, params, config, tokenizer, args)
               for run in runs]
  for embedder in embedders:
    warm_up(embedder, source)
  seconds = [[] for _ in runs]
  for repeat in range(args.repeats):
    for n, embedder in enumerate(embedders):
      out = os.path.join(workdir, f'run{n}_{repeat}')
      seconds[n].append(time_export(embedder, source, out))
  results = []
  for (name, budget, multiple), embedder, times in zip(runs, embedders, seconds):
    best = min(times)
    results.append({
        'run': name, 'max_tokens': budget, 'row_multiple': multiple,
        'rows_per_batch': embedder.batch_rows,
        'tokens_per_row': embedder.input_config.tokens_per_row,
        'images_per_row': embedder.input_config.images_per_row,
        'seconds': best, 'seconds_all': times,
        'images_per_second': len(source) / best,
        **padding_stats(embedder, source)})
  add_ratios(results)
  return config, results


def add_ratios(results):
  """Speed against the BASELINE run at the same budget, where there is one."""
  base = {r['max_tokens']: r['images_per_second'] for r in results
          if r['run'] == BASELINE}
  for r in results:
    if r['max_tokens'] in base:
      r[f'vs_{BASELINE.replace("/", "_")}'] = (
          r['images_per_second'] / base[r['max_tokens']])


def print_table(meta, results):
  """The results as a Markdown table, with a line saying what was run."""
  print(f'{meta["num_images"]} images, {meta["variant"]} '
        f'(p={meta["patch_size"]}), {meta["tokens_per_batch"]} tokens per '
        f'batch, best of {meta["repeats"]}, {meta["device"]}')
  ratio = f'vs_{BASELINE.replace("/", "_")}'
  print()
  print(f'| budget | run | L x E | rows/batch | img/s | tokens/img | img/row '
        f'| batches | padding | vs {BASELINE} |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in results:
    vs = f'{r[ratio]:.2f}x' if ratio in r else '-'
    print(f'| {r["max_tokens"]} | {r["run"]} | {r["tokens_per_row"]} x '
          f'{r["images_per_row"]} | {r["rows_per_batch"]} | '
          f'{r["images_per_second"]:.1f} | {r["tokens_per_image"]:.1f} | '
          f'{r["mean_images_per_row"]:.2f} | {r["batches"]} | '
          f'{r["padding_fraction"]:.1%} | {vs} |')


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    folder = args.images
    if folder is None:
      folder = os.path.join(workdir, 'images')
      os.makedirs(folder)
      write_synthetic_images(folder, args.num_images)
    source = datasets.ImageFiles(datasets.find_images(folder))
    config, runs = benchmark(args, source, workdir)
  results = {
      'variant': args.variant,
      'patch_size': two_towers.base_patch_size(config.model.image),
      'num_images': len(source), 'tokens_per_batch': args.tokens_per_batch,
      'repeats': args.repeats, 'device': jax.devices()[0].device_kind,
      'runs': runs,
  }
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    print_table(results, runs)
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
