"""Image-text retrieval recall@K of a checkpoint (COCO / Flickr30k style).

  python eval/retrieval.py --checkpoint workdirs/run \
      --data dataset_coco.json --images_root /data/coco --split test \
      --output results/coco.json

--data is a Karpathy split file (.json: dataset_coco.json,
dataset_flickr30k.json), a JSONL of {"image", "captions"} (.jsonl) or a
Flickr token file ("img.jpg#k<TAB>caption"; --image_list picks the split).
Recall follows the standard protocol: text->image counts a caption when its
image is in the top K; image->text counts an image when any of its captions
is. Images that fail to decode are listed and left out with their captions.
Multi-host: run it on every host with --coordinator_address, --num_processes
and --process_id (none on a TPU slice); each embeds its share of the images,
and process 0 writes the output.
"""

import argparse
import time

import numpy as np

from lit_navit import fs
from lit_navit.evaluate import cli
from lit_navit.evaluate import datasets
from lit_navit.evaluate import retrieval


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  cli.add_model_flags(parser)
  parser.add_argument('--data', required=True,
                      help='Karpathy .json, .jsonl, or Flickr token file')
  parser.add_argument('--images_root', default=None,
                      help='folder the image paths are relative to '
                      '(default for .jsonl: its own folder)')
  parser.add_argument('--split', default='test', help='Karpathy split to use')
  parser.add_argument('--image_list', default=None,
                      help='token files: image names of the split, one a line')
  parser.add_argument('--ks', default='1,5,10', help='K values, comma separated')
  cli.add_host_flags(parser)
  return parser.parse_args(argv)


def parse_ks(text):
  """--ks as positive ints; ValueError naming the flag otherwise."""
  try:
    ks = [int(k) for k in text.split(',')]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise ValueError(f'--ks {text!r}: expected positive integers, comma separated')
  return ks


def evaluate(args):
  """Embeds the set and returns the JSON-ready results."""
  ks = parse_ks(args.ks)
  data = datasets.read_retrieval(args.data, args.images_root, args.split,
                                 args.image_list)
  if not len(data.source):
    raise ValueError(f'{args.data} holds no image-caption pairs: nothing to evaluate')
  budgets = cli.parse_token_budgets(args.max_tokens)
  if len(budgets) != 1:
    raise ValueError(f'--max_tokens {args.max_tokens!r}: give one budget')
  config, params = cli.load_checkpoint(args.checkpoint)
  embedder = cli.make_embedder(config, params, args, budgets[0])
  start = time.perf_counter()
  image_emb, failed = embedder.images(data.source, progress=not args.no_progress)
  seconds = time.perf_counter() - start
  ok = np.ones(len(data.source), bool)
  ok[[index for index, _, _ in failed]] = False
  # Renumber the images that decoded; drop captions of those that did not.
  new_index = np.cumsum(ok) - 1
  kept_texts = ok[data.text_to_image]
  captions = [c for c, keep in zip(data.captions, kept_texts) if keep]
  if not ok.any():
    raise ValueError(f'none of the {len(ok)} images of {args.data} could be read '
                     f'(the first: {failed[0][1]}: {failed[0][2]}): nothing to evaluate')
  # Said first: a recall over what is left is only as good as what is left.
  print(f'evaluated {int(ok.sum())} images and {len(captions)} captions; dropped '
        f'{len(failed)} images that could not be read, with their '
        f'{len(data.captions) - len(captions)} captions'
        + (' (listed under "failed" in --output)' if failed else ''))
  text_emb = embedder.texts(captions, progress=not args.no_progress)
  metrics = retrieval.recall_at_k(image_emb[ok], text_emb,
                                  new_index[data.text_to_image[kept_texts]], ks=ks)
  for name, value in metrics.items():
    print(f'{name}: {100 * value:.2f}')
  return {
      'checkpoint': fs.absolute(args.checkpoint),
      'data': fs.absolute(args.data),
      'split': args.split,
      'resize': embedder.resize,
      'patch_size': embedder.patch_size,
      'max_tokens': embedder.max_tokens,
      'num_images': int(ok.sum()),
      'num_texts': len(captions),
      'num_failed': len(failed),
      'images_per_second': len(data.source) / seconds,
      **metrics,
      'failed': [{'index': i, 'key': key, 'reason': reason}
                 for i, key, reason in failed],
  }


def main(argv=None):
  args = parse_args(argv)
  cli.join_hosts(args)
  results = evaluate(args)
  if args.output and cli.is_writer():
    cli.write_json(args.output, results)
  return results


if __name__ == '__main__':
  cli.run(main)
