"""Zero-shot ImageNet (or any folder-of-classes) classification of a checkpoint.

  python eval/zero_shot_imagenet.py --checkpoint workdirs/run \
      --imagenet /data/imagenet --max_tokens 64,128,256,576 \
      --output results/zs.json

Images keep their aspect ratio and are resized to fit each token budget in
--max_tokens (by default --resize fit, as SigLIP 2 NaFlex reports it;
--resize native never scales an image up); every budget is evaluated in one
run, and with more than one the accuracy-vs-tokens curve is drawn next to
the JSON (or to --plot).
Reports top-1, top-5 and per-class accuracy. Class names and the 80 / 7
prompt templates are CLIP's unless --classnames / --templates say otherwise.
--synthetic N evaluates the held-out synthetic shape-colour pairs instead,
through the same function as the trainer's eval hook.
Multi-host: run it on every host with --coordinator_address, --num_processes
and --process_id (none on a TPU slice); each embeds its share of the images,
and process 0 writes the outputs.
"""

import argparse
import os
import time

import numpy as np

from lit_navit import fs
from lit_navit.data import synthetic
from lit_navit.evaluate import cli
from lit_navit.evaluate import datasets
from lit_navit.evaluate import imagenet_metadata
from lit_navit.evaluate import zero_shot


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  cli.add_model_flags(parser, max_tokens_help='token budget(s) per image, '
                      'one or a comma list like 64,128,256,576')
  data = parser.add_mutually_exclusive_group(required=True)
  data.add_argument('--imagenet', help='ImageNet val as DIR/<wnid>/*.JPEG '
                    '(or DIR/val/<wnid>/*.JPEG)')
  data.add_argument('--folder', help='any DIR/<class>/<images> dataset; '
                    'classes in sorted folder order')
  data.add_argument('--tfrecord', help='tf.train.Example files (glob, '
                    '{000..099} ranges or a comma list) with image and label')
  data.add_argument('--tfds', action='store_true',
                    help='TFDS imagenet2012, prepared under --tfds_data_dir')
  data.add_argument('--synthetic', type=int, metavar='N',
                    help='N held-out images of the checkpoint\'s synthetic '
                    'source, over all shape-colour classes (what the trainer\'s '
                    'eval hook reports)')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--tfds_split', default='validation')
  parser.add_argument('--image_key', default='image', help='--tfrecord image feature')
  parser.add_argument('--label_key', default='label', help='--tfrecord label feature')
  parser.add_argument('--label_offset', type=int, default=0,
                      help='added to --tfrecord integer labels (-1 for 1-based)')
  parser.add_argument('--classnames', default=None,
                      help='class-name file: one a line in class order, or JSON '
                      '(list, or {folder: name}); default: CLIP\'s ImageNet names, '
                      'or the folder names for --folder')
  parser.add_argument('--templates', default=None,
                      help="'80' or '7' (CLIP's ImageNet prompts) or a file with "
                      "one template a line, '{}' marking the class name; "
                      "default: '80', or the synthetic prompts for --synthetic")
  parser.add_argument('--max_images', type=int, default=None,
                      help='evaluate an evenly spaced subset of this many images')
  parser.add_argument('--plot', default=None,
                      help='accuracy-vs-tokens PNG (default: beside --output)')
  cli.add_host_flags(parser)
  return parser.parse_args(argv)


def load_dataset(args, config):
  if args.synthetic:
    source = zero_shot.synthetic_heldout_source(config.input.source, args.synthetic)
    labels = [source.attributes(i)['class_id'] for i in range(len(source))]
    return datasets.ClassificationSet(source, np.asarray(labels, np.int64),
                                      synthetic.class_names())
  classnames = (datasets.read_classnames(args.classnames, imagenet_metadata.WNIDS)
                if args.classnames and not args.folder else None)
  if args.imagenet:
    return datasets.imagenet_folder(args.imagenet, classnames)
  if args.folder:
    return datasets.image_folder(args.folder, args.classnames)
  if args.tfds:
    return datasets.imagenet_tfds(args.tfds_split, args.tfds_data_dir, classnames)
  return datasets.tfrecord_classification(
      args.tfrecord, image_key=args.image_key, label_key=args.label_key,
      label_offset=args.label_offset,
      classnames=classnames or imagenet_metadata.CLASSNAMES)


def load_templates(args):
  value = args.templates or ('synthetic' if args.synthetic else '80')
  if value == 'synthetic':
    return list(zero_shot.SYNTHETIC_TEMPLATES)
  if value == '80':
    return list(imagenet_metadata.TEMPLATES)
  if value == '7':
    return list(imagenet_metadata.TEMPLATES_7)
  return datasets.read_templates(value)


def evaluate(args):
  """Runs every budget; returns the JSON-ready results."""
  config, params = cli.load_checkpoint(args.checkpoint)
  data = load_dataset(args, config)
  templates = load_templates(args)
  source, labels = data.source, data.labels
  if args.max_images and args.max_images < len(source):
    indices = np.linspace(0, len(source) - 1, args.max_images).round().astype(int)
    source, labels = datasets.Subset(source, indices), labels[indices]
  budgets = cli.parse_token_budgets(args.max_tokens)
  class_emb = None
  runs = []
  for max_tokens in budgets:
    embedder = cli.make_embedder(config, params, args, max_tokens)
    if class_emb is None:
      # Text does not depend on the image budget: embed the prompts once.
      class_emb = zero_shot.class_embeddings(
          lambda t: embedder.texts(t, progress=not args.no_progress),
          data.classnames, templates)
    start = time.perf_counter()
    images = embedder.images(source, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    metrics = zero_shot.evaluate_classification(
        embedder, source, labels, data.classnames, templates,
        images=images, class_emb=class_emb)
    print(f'max_tokens {embedder.max_tokens}: top-1 {metrics["top1"]:.4f}  '
          f'top-5 {metrics["top5"]:.4f}  ({metrics["num_images"]} images, '
          f'{metrics["num_failed"]} failed, {len(source) / seconds:.1f} img/s)')
    runs.append({
        'max_tokens': embedder.max_tokens,
        'resize': embedder.resize,
        'top1': metrics['top1'],
        'top5': metrics['top5'],
        'mean_per_class': metrics['mean_per_class'],
        'num_images': metrics['num_images'],
        'num_failed': metrics['num_failed'],
        'images_per_second': len(source) / seconds,
        'per_class': [{'class': name, 'accuracy': acc, 'count': count}
                      for name, acc, count in zip(data.classnames,
                                                  metrics['per_class'],
                                                  metrics['count_per_class'])],
        'failed': [{'index': i, 'key': key, 'reason': reason}
                   for i, key, reason in metrics['failed']],
    })
  return {
      'checkpoint': fs.absolute(args.checkpoint),
      'patch_size': embedder.patch_size,
      'num_classes': len(data.classnames),
      'num_templates': len(templates),
      'results': runs,
  }


def plot(results, path):
  """Top-1 and top-5 accuracy against the token budget, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = sorted(results['results'], key=lambda r: r['max_tokens'])
  tokens = [r['max_tokens'] for r in runs]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, label in (('top1', 'top-1'), ('top5', 'top-5')):
    ax.plot(tokens, [100 * r[key] for r in runs], marker='o', label=label)
  ax.set_xscale('log', base=2)
  ax.set_xticks(tokens, [str(t) for t in tokens])
  ax.set_xlabel('max tokens per image')
  ax.set_ylabel('zero-shot accuracy (%)')
  ax.set_title(f'p={results["patch_size"]}, {results["num_templates"]} templates')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with fs.atomic_write(path) as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  cli.join_hosts(args)
  results = evaluate(args)
  plot_path = args.plot or (os.path.splitext(args.output)[0] + '.png'
                            if args.output and len(results['results']) > 1 else None)
  if plot_path:
    if cli.is_writer():
      plot(results, plot_path)
    results['plot'] = plot_path
  if args.output and cli.is_writer():
    cli.write_json(args.output, results)
  return results


if __name__ == '__main__':
  cli.run(main)
