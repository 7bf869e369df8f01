"""Imports a big_vision SigLIP / SigLIP 2 .npz into a workdir the evaluators read.

  python -m lit_navit.interop.big_vision_import --npz siglip2_b16_naflex.npz \\
      --tokenizer gemma_tokenizer.model --workdir workdirs/siglip2_b16_naflex

writes WORKDIR/checkpoints/0/ (params and the config: model sizes read off
the checkpoint, tokenizer settings of its recipe) and copies the tokenizer
to WORKDIR/tokenizer.model. eval/zero_shot_imagenet.py, eval/retrieval.py
and eval/export_embeddings.py then take `--checkpoint WORKDIR`. Released
files' 'params/' (or 'opt/target/') prefix is dropped. Recipes: see
interop/workdir.py; by default SigLIP 2 is assumed for a 256k vocabulary or
a NaFlex image tower.
"""

import dataclasses

from lit_navit import checkpoint
from lit_navit import fs
from lit_navit.interop import big_vision
from lit_navit.interop import cli
from lit_navit.interop import workdir as workdir_lib


def import_checkpoint(npz: str, tokenizer: str, workdir: str, *,
                      options: big_vision.Options = big_vision.Options(),
                      recipe: str | None = None, max_tokens: int | None = None):
  """Writes WORKDIR/checkpoints/0 from `npz`; returns (config, params)."""
  arrays = big_vision.load_npz(npz)
  model_config = big_vision.model_config(arrays, options)
  params = big_vision.to_params(arrays, model_config)
  config = workdir_lib.write(
      workdir, model_config, params, tokenizer, recipe=recipe, max_tokens=max_tokens,
      record_name='big_vision_import.json',
      record=dict(npz=fs.absolute(npz), options=dataclasses.asdict(options)))
  return config, params


def parse_args(argv=None):
  parser = cli.Parser(__doc__)
  parser.add_argument('--npz', required=True, help='big_vision two-tower checkpoint')
  parser.add_argument('--tokenizer', required=True,
                      help='its sentencepiece .model (c4_en for SigLIP, Gemma for SigLIP 2)')
  parser.add_argument('--workdir', required=True, help='where the checkpoint goes')
  parser.add_argument('--recipe', choices=sorted(workdir_lib.RECIPES), default=None,
                      help='tokenization (default: siglip2 for a 256k vocabulary '
                      'or NaFlex, else siglip)')
  parser.add_argument('--text_pool', default='last',
                      help="big_vision text pool_type when the checkpoint has no MAP "
                      "head: last (SigLIP and SigLIP 2), first, gap, gmp")
  parser.add_argument('--image_pool', default='gap',
                      help='big_vision image pool_type when the checkpoint has no '
                      'MAP head: gap')
  parser.add_argument('--image_posemb', default='sincos2d',
                      help='ViT posemb when the checkpoint stores none: sincos2d')
  parser.add_argument('--image_grid', default=None, metavar='ROWSxCOLS',
                      help="a ViT posemb's grid when it is not square, e.g. 16x32")
  parser.add_argument('--scan', choices=('keep', 'true', 'false'), default='keep',
                      help='block layout of the imported params (default: the '
                      "checkpoint's)")
  parser.add_argument('--max_tokens', type=int, default=None,
                      help='eval tokens per image (default: the ViT\'s trained '
                      'grid, or 256 for NaFlex)')
  return parser.parse_args(argv)


def main(argv):
  args = parse_args(argv)
  scan = {'keep': None, 'true': True, 'false': False}[args.scan]
  grid = None
  if args.image_grid:
    try:
      grid = tuple(int(n) for n in args.image_grid.lower().split('x'))
    except ValueError:
      grid = ()
    if len(grid) != 2:
      raise ValueError(f'--image_grid {args.image_grid!r}: expected ROWSxCOLS')
  options = big_vision.Options(image_pool=args.image_pool,
                                image_posemb=args.image_posemb,
                                text_pool=args.text_pool, scan=scan,
                                image_grid=grid)
  config, _ = import_checkpoint(args.npz, args.tokenizer, args.workdir,
                                options=options, recipe=args.recipe,
                                max_tokens=args.max_tokens)
  step_dir = fs.join(fs.absolute(args.workdir), checkpoint.CHECKPOINT_DIR, '0')
  print(f'imported {args.npz} -> {step_dir}: {workdir_lib.summary(config)}')


if __name__ == '__main__':
  cli.run(main)
