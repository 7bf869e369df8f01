"""The workdir an import writes: checkpoints/0 (params and a full config
around the imported model), the tokenizer copied beside it, and a JSON
record of where it came from. The eval scripts, LiT `init` and the exports
read it like any training workdir.

Recipes (tokenization as big_vision's pp does it; both lowercase captions and
keep EOS as the last token of a cut caption):
  siglip   c4_en (or mc4) sentencepiece, EOS appended, padded with 1 (EOS).
  siglip2  Gemma sentencepiece, EOS appended, padded with 0 (Gemma's pad).
"""

import json
import logging

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


def training_config(model_config, tokenizer: str, recipe: str, max_tokens: int,
                    tokenization: dict | None = None):
  """A full lit_navit config around an imported model, as a checkpoint holds
  it; `tokenization` (pad_id, sticky_eos, lowercase) overrides the recipe's."""
  c = config_lib.default_config()
  c.model = model_config
  c.input.tokenizer = tokenizer
  c.input.text_len = model_config.text.max_len
  c.input.update(tokenization or RECIPES[recipe])
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


def write(workdir: str, model_config, params, tokenizer: str, *, recipe: str | None,
          max_tokens: int | None, record_name: str, record: dict,
          tokenization: dict | None = None):
  """Writes WORKDIR/checkpoints/0, WORKDIR/tokenizer.model and
  WORKDIR/`record_name` (JSON: `record` plus the recipe); returns the config."""
  check_tokenizer(tokenizer, model_config)
  recipe = recipe or guess_recipe(model_config)
  fs.makedirs(workdir)
  copied = fs.absolute(fs.join(workdir, 'tokenizer.model'))
  if fs.absolute(tokenizer) != copied:
    with fs.atomic_write(copied) as f:
      f.write(fs.read_bytes(tokenizer))
  config = training_config(model_config, copied, recipe,
                           max_tokens or default_max_tokens(model_config), tokenization)
  saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  saver.save(0, {'params': params}, {}, config)
  saver.close()
  with fs.atomic_write(fs.join(workdir, record_name), 'w', encoding='utf-8') as f:
    json.dump(dict(record, tokenizer=fs.absolute(tokenizer), recipe=recipe,
                   tokenization=tokenization), f, indent=2)
  return config


def adopt_tower(config, path: str, tower: str) -> None:
  """Makes training `config`'s `tower` ('img' or 'txt') the one of the
  checkpoint at `path` (a workdir, e.g. an import, or a step directory).

  For LiT: the tower's model config comes from the checkpoint's, with the
  input settings it was used with (patch sizes; tokenizer and caption
  settings), and embed_dim becomes its output width. The other tower keeps
  its config and gets a head to embed_dim.
  """
  saved = checkpoint.load_config(path)
  if tower == 'img':
    config.model.image = saved.model.image
    config.input.patch_sizes = saved.input.patch_sizes
  elif tower == 'txt':
    config.model.text = saved.model.text
    for key in ('tokenizer', 'text_len', 'pad_id', 'sticky_eos', 'lowercase'):
      config.input[key] = saved.input[key]
  else:
    raise ValueError(f'tower {tower!r}: expected img or txt')
  config.model.embed_dim = saved.model.embed_dim


def summary(config) -> str:
  """One line describing an imported model."""
  m = config.model
  return (f'image {m.image.stem} stem, {m.image.width}x{m.image.depth}, '
          f'posemb {m.image.posemb}, pool {m.image.pool}; text {m.text.width}x'
          f'{m.text.depth}, vocab {m.text.vocab_size}, T={m.text.max_len}, '
          f'pool {m.text.pool}; embed_dim {m.embed_dim}; tokenizer pad '
          f'{config.input.pad_id}')
