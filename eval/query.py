"""Queries exported image embeddings by text or by image.

  python eval/query.py --checkpoint workdirs/run --index embeddings/photos \
      --text "a red circle" --k 5

Embeds each --text / --image query with the checkpoint and prints the top-k
exported images (brute force over all parts). The checkpoint must be the
one the export was made with (its params_sha256 is checked; another one's
embeddings would give confident nonsense), unless --allow_other_checkpoint;
patch size, token budget and --resize default to the export's.
"""

import argparse
import json

from lit_navit import fs
from lit_navit.evaluate import cli
from lit_navit.evaluate import datasets
from lit_navit.evaluate import export


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  cli.add_model_flags(parser, resize=None)
  parser.add_argument('--index', required=True,
                      help='an export folder (eval/export_embeddings.py)')
  parser.add_argument('--text', action='append', default=[],
                      help='a text query; repeat for more')
  parser.add_argument('--image', action='append', default=[],
                      help='an image file query; repeat for more')
  parser.add_argument('--k', type=int, default=10, help='results per query')
  parser.add_argument('--allow_other_checkpoint', action='store_true',
                      help='query even though the index was exported from '
                      'other weights than --checkpoint')
  return parser.parse_args(argv)


def check_same_weights(manifest, params, args):
  """Refuses an index exported from other weights, naming both."""
  exported = manifest.get('params_sha256')
  given = export.params_fingerprint(params)
  if exported is None or exported == given or args.allow_other_checkpoint:
    return
  source = manifest.get('checkpoint') or 'a checkpoint not recorded'
  raise ValueError(
      f'{args.index} was exported from {source} (params_sha256 {exported}), '
      f'not from --checkpoint {fs.absolute(args.checkpoint)} (params_sha256 '
      f'{given}): its embeddings do not match this model\'s queries. Query with '
      'the export\'s checkpoint, or pass --allow_other_checkpoint')


def main(argv=None):
  args = parse_args(argv)
  if not args.text and not args.image:
    raise ValueError('give at least one --text or --image query')
  if not all(text.strip() for text in args.text):
    raise ValueError('--text is empty: give the words to search for')
  if args.k < 1:
    raise ValueError(f'--k must be at least 1, got {args.k}')
  manifest_path = fs.join(args.index, export.MANIFEST)
  if not fs.isfile(manifest_path):
    raise FileNotFoundError(f'not an export folder (no {export.MANIFEST}): {args.index}')
  manifest = json.loads(fs.read_text(manifest_path))
  budgets = cli.parse_token_budgets(args.max_tokens or manifest['max_tokens'])
  if len(budgets) != 1:
    raise ValueError(f'--max_tokens {args.max_tokens!r}: give one budget')
  if args.patch_size is None:
    args.patch_size = manifest['patch_size']
  if args.resize is None:
    # Exports that predate --resize were all 'fit'.
    args.resize = manifest.get('resize', 'fit')
  config, params = cli.load_checkpoint(args.checkpoint)
  check_same_weights(manifest, params, args)
  embedder = cli.make_embedder(config, params, args, budgets[0])
  if embedder.dim != manifest['dim']:
    raise ValueError(f'the checkpoint embeds into {embedder.dim} dims but the '
                     f'export in {args.index} holds {manifest["dim"]}')
  queries = [{'text': t} for t in args.text] + [{'image': p} for p in args.image]
  vectors = []
  if args.text:
    vectors.extend(embedder.texts(args.text))
  if args.image:
    emb, failed = embedder.images(datasets.ImageFiles(args.image), progress=False)
    if failed:
      _, key, reason = failed[0]
      raise ValueError(f'query image {key} cannot be read: {reason}')
    vectors.extend(emb)
  results = export.query(args.index, vectors, k=args.k)
  for q, hits in zip(queries, results):
    print(f'{q.get("text", q.get("image"))!r}:')
    q['results'] = hits
    for rank, hit in enumerate(hits, start=1):
      label = hit.get('image_path', hit.get('key'))
      caption = f'  "{hit["caption"]}"' if hit.get('caption') else ''
      print(f'  {rank:2d}. {hit["score"]:.4f}  {label}{caption}')
  if args.output:
    cli.write_json(args.output, {'index': fs.absolute(args.index),
                                 'checkpoint': fs.absolute(args.checkpoint),
                                 'queries': queries})
  return queries


if __name__ == '__main__':
  cli.run(main)
