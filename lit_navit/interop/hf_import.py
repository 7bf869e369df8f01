"""Imports a transformers SiglipModel / Siglip2Model folder into a lit_navit workdir.

  python -m lit_navit.interop.hf_import --model hf/siglip2-base-patch16-naflex \\
      --workdir workdirs/siglip2_b16_naflex

reads config.json, model.safetensors (numpy API: no torch needed) and the
sentencepiece model (spiece.model or tokenizer.model, or --tokenizer), and
writes the workdir big_vision_import writes: the eval scripts, LiT `init`
and both exports take it. The pad token and lowercasing come from
tokenizer_config.json when the folder has one, else from the recipe.
"""

import json
import os

import sentencepiece as spm

from lit_navit import checkpoint
from lit_navit import fs
from lit_navit.interop import big_vision
from lit_navit.interop import cli
from lit_navit.interop import hf
from lit_navit.interop import workdir as workdir_lib

TOKENIZER_FILES = ('spiece.model', 'tokenizer.model')


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not JSON ({e})') from e


def _weight_files(folder: str) -> list:
  """model.safetensors, or the shards its index names (large hub models)."""
  single = os.path.join(folder, 'model.safetensors')
  if os.path.exists(single):
    return [single]
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.exists(index):
    shards = sorted(set(_read_json(index).get('weight_map', {}).values()))
    return [os.path.join(folder, shard) for shard in shards]
  raise FileNotFoundError(f'{folder} has no model.safetensors nor '
                          'model.safetensors.index.json (.bin files are not read)')


def load(folder: str, scan: bool | None = None):
  """(model config, params, config.json) of a transformers folder."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  config = _read_json(os.path.join(folder, 'config.json'))
  hf.check_importable(config)
  state = {}
  for weights in _weight_files(folder):
    try:
      state.update(safetensors_numpy.load_file(weights))
    except safetensors.SafetensorError as e:  # Not a ValueError: say it in one line too.
      raise ValueError(f'{weights}: not a readable safetensors file ({e})') from e
  arrays = hf.from_hf(state, config)
  model_config = big_vision.model_config(arrays, big_vision.Options(scan=scan))
  return model_config, big_vision.to_params(arrays, model_config), config


def tokenization(folder: str, tokenizer: str) -> dict | None:
  """pad_id and lowercase of the folder's tokenizer_config.json, else None."""
  path = os.path.join(folder, 'tokenizer_config.json')
  if not os.path.exists(path):
    return None
  settings = _read_json(path)
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  pad = settings.get('pad_token')
  pad = pad.get('content') if isinstance(pad, dict) else pad
  if pad is None or (sp.piece_to_id(pad) == sp.unk_id()
                     and pad != sp.id_to_piece(sp.unk_id())):
    return None  # Not a piece of this model: the recipe decides.
  return dict(pad_id=int(sp.piece_to_id(pad)), sticky_eos=True,
              lowercase=bool(settings.get('do_lower_case', True)))


def import_folder(folder: str, workdir: str, *, tokenizer: str | None = None,
                  recipe: str | None = None, max_tokens: int | None = None,
                  scan: bool | None = None):
  """Writes WORKDIR/checkpoints/0 from a transformers folder; returns (config, params)."""
  model_config, params, hf_config = load(folder, scan)
  if tokenizer is None:
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES
             if os.path.exists(os.path.join(folder, n))]
    if not found:
      raise FileNotFoundError(f'{folder} has no sentencepiece model '
                              f'({" or ".join(TOKENIZER_FILES)}); pass --tokenizer')
    tokenizer = found[0]
  settings = None if recipe else tokenization(folder, tokenizer)
  recipe = recipe or ('siglip2' if hf_config['model_type'] == 'siglip2' else 'siglip')
  config = workdir_lib.write(
      workdir, model_config, params, tokenizer, recipe=recipe, max_tokens=max_tokens,
      tokenization=settings, record_name='hf_import.json',
      record=dict(folder=fs.absolute(folder)))
  return config, params


def main(argv):
  parser = cli.Parser(__doc__)
  parser.add_argument('--model', required=True, help='a SiglipModel or Siglip2Model folder')
  parser.add_argument('--workdir', required=True, help='where the checkpoint goes')
  parser.add_argument('--tokenizer', default=None,
                      help='its sentencepiece .model (default: the folder\'s)')
  parser.add_argument('--recipe', choices=sorted(workdir_lib.RECIPES), default=None,
                      help='tokenization (default: the folder\'s tokenizer_config.json, '
                      'else siglip2 for Siglip2Model, siglip for SiglipModel)')
  parser.add_argument('--max_tokens', type=int, default=None,
                      help="eval tokens per image (default: the ViT's grid, or 256 for NaFlex)")
  parser.add_argument('--scan', choices=('true', 'false'), default='true',
                      help='block layout of the imported params')
  args = parser.parse_args(argv)
  config, _ = import_folder(args.model, args.workdir, tokenizer=args.tokenizer,
                            recipe=args.recipe, max_tokens=args.max_tokens,
                            scan=args.scan == 'true')
  step_dir = fs.join(fs.absolute(args.workdir), checkpoint.CHECKPOINT_DIR, '0')
  print(f'imported {args.model} -> {step_dir}: {workdir_lib.summary(config)}')


if __name__ == '__main__':
  cli.run(main)
