"""Exports a lit_navit checkpoint as a big_vision two-tower .npz.

  python -m lit_navit.interop.big_vision_export --checkpoint workdirs/run --npz run.npz

writes run.npz (big_vision's names and shapes: loadable with numpy alone or
big_vision's two_towers.load) and run.json, the big_vision `model_cfg` that
builds the matching model: `models/vit.py` for a conv stem, NaFlex
`naflex_vit.py` for a dense one. Models with options big_vision lacks
(qk_norm, no biases, factorized or fractional posembs) are refused, naming
the option. A text tower trained with masked padding (our default) is
exported as is; big_vision, which attends to padding, then embeds padded
captions differently.
"""

import json
import logging
import os

from lit_navit import checkpoint
from lit_navit import fs
from lit_navit.interop import big_vision
from lit_navit.interop import cli

log = logging.getLogger('lit_navit')


def export_checkpoint(path: str, npz: str, scan: bool | None = None) -> dict:
  """Writes `npz` and its model_cfg JSON from a workdir or step directory."""
  config, params = checkpoint.load_for_inference(path)
  arrays = big_vision.from_params(params, config.model, scan=scan)
  if config.model.text.get('mask_padding', True):
    log.warning('the text tower masks padding; big_vision attends to it, so '
                'captions with padding embed differently there')
  fs.makedirs(fs.dirname(fs.absolute(npz)))
  big_vision.save_npz(npz, arrays)
  model_cfg = big_vision.bv_model_config(config.model)
  if scan is not None:
    model_cfg['image']['scan'] = model_cfg['text']['scan'] = scan
  with fs.atomic_write(os.path.splitext(npz)[0] + '.json', 'w', encoding='utf-8') as f:
    json.dump(model_cfg, f, indent=2)
  return arrays


def main(argv):
  parser = cli.Parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a workdir (its newest checkpoint) or one step directory')
  parser.add_argument('--npz', required=True, help='the .npz to write')
  parser.add_argument('--scan', choices=('keep', 'true', 'false'), default='keep',
                      help='block layout in the file (default: the model\'s)')
  args = parser.parse_args(argv)
  scan = {'keep': None, 'true': True, 'false': False}[args.scan]
  arrays = export_checkpoint(args.checkpoint, args.npz, scan)
  print(f'wrote {len(arrays)} arrays to {args.npz}')


if __name__ == '__main__':
  cli.run(main)
