"""Exports a lit_navit checkpoint as a transformers SiglipModel / Siglip2Model folder.

  python -m lit_navit.interop.hf_export --checkpoint workdirs/run --out hf/run

writes what `transformers.AutoModel.from_pretrained('hf/run')` (and
AutoImageProcessor, AutoTokenizer) load offline: config.json,
model.safetensors (written with safetensors' numpy API), preprocessor_config.json
(Siglip2ImageProcessor with patch_size and max_num_patches for a NaFlex
tower, SiglipImageProcessor at the trained grid's size for a conv one) and
the tokenizer (spiece.model, tokenizer_config.json: a SiglipTokenizer with
our pad, EOS, lowercasing and caption length). Models transformers cannot
express are refused, naming the option (interop/hf.py).
"""

import json
import logging

import sentencepiece as spm

from lit_navit import checkpoint
from lit_navit import fs
from lit_navit.data import text as text_lib
from lit_navit.interop import big_vision
from lit_navit.interop import cli
from lit_navit.interop import hf
from lit_navit.models import two_towers

log = logging.getLogger('lit_navit')


def image_processor_config(config) -> dict:
  """preprocessor_config.json: pixels in [-1, 1], bilinear resize as ours."""
  img = config.model.image
  patch = int(two_towers.base_patch_size(img))
  common = dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                do_convert_rgb=True)
  if hf.model_type(config.model) == 'siglip2':
    return dict(common, image_processor_type='Siglip2ImageProcessor', patch_size=patch,
                max_num_patches=int(config.input.resolution.max_tokens))
  side = int(two_towers.posemb_grid(img)[0]) * patch
  return dict(common, image_processor_type='SiglipImageProcessor',
              size=dict(height=side, width=side))


def tokenizer_config(ours: text_lib.Tokenizer, sp) -> dict:
  """tokenizer_config.json: a SiglipTokenizer that tokenizes as `ours` does
  (it also drops punctuation, which ours keeps)."""
  if not ours.sticky_eos:
    log.warning('input.sticky_eos=False: transformers keeps EOS on a cut caption')
  piece = lambda i: sp.id_to_piece(int(i))
  return dict(tokenizer_class='SiglipTokenizer', model_max_length=int(ours.length),
              do_lower_case=ours.lowercase, eos_token=piece(ours.eos_id),
              pad_token=piece(ours.pad_id), unk_token=piece(sp.unk_id()),
              padding_side='right')


def export_checkpoint(path: str, out: str) -> dict:
  """Writes the folder `out` from a workdir or step directory; returns the state dict."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  config, params = checkpoint.load_for_inference(path)
  hf.check_exportable(config.model)
  if config.model.text.get('mask_padding', True):
    log.warning('the text tower masks padding; transformers attends to it, so '
                'captions with padding embed differently there')
  if hf.model_type(config.model) == 'siglip2':
    log.warning('load the tokenizer with SiglipTokenizer.from_pretrained: '
                "AutoTokenizer gives a siglip2 folder Gemma's Siglip2Tokenizer, "
                'which needs a tokenizer.json')
  if config.model.loss != 'sigmoid':
    log.warning('a %s-loss model has no logit bias: logit_bias is 0', config.model.loss)
  tokenizer = text_lib.Tokenizer.from_config(config.input)
  spm_bytes = fs.read_bytes(config.input.tokenizer)
  sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
  arrays = big_vision.from_params(params, config.model, scan=False)
  state = hf.to_hf(arrays, config.model)
  fs.makedirs(out)
  safetensors_numpy.save_file(state, fs.join(out, 'model.safetensors'),
                              metadata={'format': 'pt'})
  files = {'config.json': hf.hf_config(config.model, pad_id=tokenizer.pad_id,
                                       eos_id=tokenizer.eos_id),
           'preprocessor_config.json': image_processor_config(config),
           'tokenizer_config.json': tokenizer_config(tokenizer, sp)}
  for name, content in files.items():
    with fs.atomic_write(fs.join(out, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=2)
  with fs.atomic_write(fs.join(out, 'spiece.model')) as f:
    f.write(spm_bytes)
  return state


def main(argv):
  parser = cli.Parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a workdir (its newest checkpoint) or one step directory')
  parser.add_argument('--out', required=True, help='the folder to write')
  args = parser.parse_args(argv)
  state = export_checkpoint(args.checkpoint, args.out)
  print(f'wrote {len(state)} tensors and the configs to {args.out}')


if __name__ == '__main__':
  cli.run(main)
