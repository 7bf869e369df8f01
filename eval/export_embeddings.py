"""Exports image (and caption) embeddings of a checkpoint for clip-retrieval
and autofaiss.

  python eval/export_embeddings.py --checkpoint workdirs/run \
      --images /data/photos --output_dir embeddings/photos

Writes img_emb/img_emb_{N}.npy, text_emb/text_emb_{N}.npy (sources with
captions), metadata/metadata_{N}.parquet and failed.jsonl, in parts of
--part_size images. Rerunning the same command resumes: finished parts are
kept, and only images the folder does not hold yet are embedded (a folder of
images that grew gets its new ones appended; a new checkpoint or setting
needs a new --output_dir). Inputs: a folder tree of images, a list file
(.jsonl / .csv / .tsv with image and caption fields, or .txt of image
paths), TFRecord or webdataset shards, or the training config's own source.

Images are embedded at --resize native by default: each at its own size,
scaled down only past --max_tokens, small ones packed several a row, which
is what makes a folder of mixed sizes fast (benchmarks/bench_export.py).
--resize fit matches the zero-shot and retrieval scripts' default (SigLIP 2
NaFlex, every image scaled to fill the budget).
Multi-host: run it on every host with --coordinator_address, --num_processes
and --process_id (none on a TPU slice); each embeds its share of each part,
and process 0 writes the folder, the same folder one host writes.
"""

import argparse

from lit_navit import fs
from lit_navit.data import sources
from lit_navit.evaluate import cli
from lit_navit.evaluate import datasets
from lit_navit.evaluate import export


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  cli.add_model_flags(parser, resize='native')
  data = parser.add_mutually_exclusive_group(required=True)
  data.add_argument('--images', help='a folder tree of images')
  data.add_argument('--list', help='.jsonl/.csv/.tsv (image, caption) list, '
                    'or .txt with one image path a line')
  data.add_argument('--tfrecord', help='tf.train.Example shards (img2dataset '
                    'layout: jpg, txt, key)')
  data.add_argument('--wds', help='webdataset .tar shards')
  data.add_argument('--train_source', action='store_true',
                    help="the checkpoint's training source (config.input.source)")
  parser.add_argument('--root', default=None,
                      help='--list: folder relative image paths resolve against')
  parser.add_argument('--output_dir', required=True, help='the export folder')
  parser.add_argument('--part_size', type=int, default=100_000,
                      help='images per part file')
  parser.add_argument('--dtype', default='float16', choices=export.DTYPES)
  parser.add_argument('--no_text', action='store_true',
                      help='skip caption embeddings even when captions exist')
  cli.add_host_flags(parser)
  return parser.parse_args(argv)


def open_source(args, config):
  """(source, key column, whether records carry captions)."""
  if args.images:
    return datasets.ImageFiles(datasets.find_images(args.images)), 'image_path', False
  if args.list and args.list.endswith('.txt'):
    root = args.root or fs.dirname(fs.absolute(args.list))
    if not fs.isfile(args.list):
      raise FileNotFoundError(f'image list not found: {args.list}')
    with fs.open(args.list, 'r', encoding='utf-8') as f:
      paths = [fs.join(root, line.strip()) for line in f if line.strip()]
    return datasets.ImageFiles(paths), 'image_path', False
  if args.list:
    return sources.FileListSource(args.list, root=args.root), 'image_path', True
  if args.tfrecord:
    return sources.TFRecordSource(args.tfrecord), 'key', True
  if args.wds:
    return sources.WebDatasetSource(args.wds), 'key', True
  return sources.make_source(config.input.source), 'key', True


def main(argv=None):
  args = parse_args(argv)
  cli.join_hosts(args)
  budgets = cli.parse_token_budgets(args.max_tokens)
  if len(budgets) != 1:
    raise ValueError(f'--max_tokens {args.max_tokens!r}: give one budget')
  config, params = cli.load_checkpoint(args.checkpoint)
  source, key_column, has_captions = open_source(args, config)
  embedder = cli.make_embedder(config, params, args, budgets[0])
  summary = export.export(
      embedder, source, args.output_dir, part_size=args.part_size,
      dtype=args.dtype, texts=has_captions and not args.no_text,
      key_column=key_column, progress=not args.no_progress,
      checkpoint=fs.absolute(args.checkpoint))
  summary.update(checkpoint=fs.absolute(args.checkpoint),
                 output_dir=fs.absolute(args.output_dir),
                 resize=embedder.resize, patch_size=embedder.patch_size,
                 max_tokens=embedder.max_tokens)
  print(f'exported {summary["num_exported"]} of {summary["num_images"]} images '
        f'({summary["num_failed"]} failed, listed in '
        f'{fs.join(args.output_dir, "failed.jsonl")}); '
        f'{summary["num_new"]} new this run in {summary["parts_written"]} parts, '
        f'{summary["num_dropped"]} rows of removed or changed images dropped, '
        f'{summary["parts_skipped"]} parts already done')
  if args.output and cli.is_writer():
    cli.write_json(args.output, summary)
  return summary


if __name__ == '__main__':
  cli.run(main)
