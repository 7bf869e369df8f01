"""Imports a big_vision SigLIP / SigLIP 2 .npz into a workdir the evaluators read.

  python -m lit_navit.import_big_vision --npz siglip2_b16_naflex.npz \\
      --tokenizer gemma_tokenizer.model --workdir workdirs/siglip2_b16_naflex

writes WORKDIR/checkpoints/0/ (params and the config: model sizes read off
the checkpoint, tokenizer settings of its recipe) and copies the tokenizer
to WORKDIR/tokenizer.model. eval/zero_shot_imagenet.py, eval/retrieval.py
and eval/export_embeddings.py then take `--checkpoint WORKDIR`.

Recipes (tokenization as big_vision's pp does it; both lowercase captions
and keep EOS as the last token of a cut caption):
  siglip   c4_en (or mc4) sentencepiece, EOS appended, padded with 1 (EOS).
  siglip2  Gemma sentencepiece, EOS appended, padded with 0 (Gemma's pad).
By default SigLIP 2 is assumed for a 256k vocabulary or a NaFlex image tower.
"""

import argparse
import dataclasses
import json
import logging

from lit_navit import big_vision
from lit_navit import checkpoint
from lit_navit import config as config_lib
from lit_navit import fs
from lit_navit.data import text as text_lib
from lit_navit.models import two_towers

RECIPES = {
    'siglip': dict(pad_id=1, sticky_eos=True, lowercase=True),
    'siglip2': dict(pad_id=0, sticky_eos=True, lowercase=True),
}
GEMMA_VOCAB = 256_000
NAFLEX_TOKENS = 256  # SigLIP 2 NaFlex's reported sequence length.

log = logging.getLogger('lit_navit')


def guess_recipe(model_config) -> str:
  """'siglip2' for Gemma's vocabulary or a NaFlex tower, else 'siglip'."""
  naflex = model_config.image.stem == 'dense'
  return 'siglip2' if naflex or model_config.text.vocab_size == GEMMA_VOCAB else 'siglip'


def default_max_tokens(model_config) -> int:
  """Tokens per image for eval: a ViT's trained grid, else NaFlex's 256."""
  if model_config.image.posemb == 'learn_1d_resized':
    rows, cols = two_towers.posemb_grid(model_config.image)
    return rows * cols
  return NAFLEX_TOKENS


def training_config(model_config, tokenizer: str, recipe: str, max_tokens: int):
  """A full lit_navit config around an imported model, as a checkpoint holds it."""
  c = config_lib.default_config()
  c.model = model_config
  c.input.tokenizer = tokenizer
  c.input.text_len = model_config.text.max_len
  c.input.update(RECIPES[recipe])
  c.model.text.pad_id = c.input.pad_id
  patch = model_config.image.base_patch_size
  c.input.patch_sizes = (patch,)
  c.input.resolution.mode = 'fit'
  c.input.resolution.max_tokens = max_tokens
  c.input.tokens_per_row = max_tokens
  c.input.images_per_row = 1
  config_lib.check_config(c)
  return c


def check_tokenizer(path: str, model_config) -> None:
  vocab = text_lib.Tokenizer(path, 1).vocab_size
  if vocab > model_config.text.vocab_size:
    raise ValueError(f'tokenizer {path!r} has {vocab} pieces but the checkpoint\'s '
                     f'text embedding only {model_config.text.vocab_size}')
  if vocab != model_config.text.vocab_size:
    log.warning('tokenizer %s has %d pieces, the checkpoint %d', path, vocab,
                model_config.text.vocab_size)


def import_checkpoint(npz: str, tokenizer: str, workdir: str, *,
                      options: big_vision.Options = big_vision.Options(),
                      recipe: str | None = None, max_tokens: int | None = None):
  """Writes WORKDIR/checkpoints/0 from `npz`; returns (config, params)."""
  arrays = big_vision.load_npz(npz)
  model_config = big_vision.model_config(arrays, options)
  params = big_vision.to_params(arrays, model_config)
  check_tokenizer(tokenizer, model_config)
  recipe = recipe or guess_recipe(model_config)
  fs.makedirs(workdir)
  copied = fs.absolute(fs.join(workdir, 'tokenizer.model'))
  if fs.absolute(tokenizer) != copied:
    with fs.atomic_write(copied) as f:
      f.write(fs.read_bytes(tokenizer))
  config = training_config(model_config, copied, recipe,
                           max_tokens or default_max_tokens(model_config))
  saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  saver.save(0, {'params': params}, {}, config)
  saver.close()
  with fs.atomic_write(fs.join(workdir, 'big_vision_import.json'), 'w',
                       encoding='utf-8') as f:
    json.dump(dict(npz=fs.absolute(npz), tokenizer=fs.absolute(tokenizer),
                   recipe=recipe, options=dataclasses.asdict(options)), f, indent=2)
  return config, params


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--npz', required=True, help='big_vision two-tower checkpoint')
  parser.add_argument('--tokenizer', required=True,
                      help='its sentencepiece .model (c4_en for SigLIP, Gemma for SigLIP 2)')
  parser.add_argument('--workdir', required=True, help='where the checkpoint goes')
  parser.add_argument('--recipe', choices=sorted(RECIPES), default=None,
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


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  args = parse_args(argv)
  scan = {'keep': None, 'true': True, 'false': False}[args.scan]
  grid = None
  if args.image_grid:
    try:
      grid = tuple(int(n) for n in args.image_grid.lower().split('x'))
    except ValueError:
      grid = ()
    if len(grid) != 2:
      raise SystemExit(f'--image_grid {args.image_grid!r}: expected ROWSxCOLS')
  options = big_vision.Options(image_pool=args.image_pool,
                                image_posemb=args.image_posemb,
                                text_pool=args.text_pool, scan=scan,
                                image_grid=grid)
  config, _ = import_checkpoint(args.npz, args.tokenizer, args.workdir,
                                options=options, recipe=args.recipe,
                                max_tokens=args.max_tokens)
  m = config.model
  step_dir = fs.join(fs.absolute(args.workdir), checkpoint.CHECKPOINT_DIR, '0')
  print(f'imported {args.npz} -> {step_dir}: '
        f'image {m.image.stem} stem, {m.image.width}x{m.image.depth}, '
        f'posemb {m.image.posemb}, pool {m.image.pool}; text {m.text.width}x'
        f'{m.text.depth}, vocab {m.text.vocab_size}, T={m.text.max_len}, '
        f'pool {m.text.pool}; embed_dim {m.embed_dim}; tokenizer pad '
        f'{config.input.pad_id}')


if __name__ == '__main__':
  main()
