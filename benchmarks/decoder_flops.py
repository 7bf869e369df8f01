"""Analytic forward FLOPs of the LocCa decoder in the SigLIP 2 recipe.

  python benchmarks/decoder_flops.py [--root CHECKOUT]

`models/flops.py` `decoder_forward_flops` of configs/siglip2_navit.py at
B/16, 4096 rows in 256 caption groups (a v5e-256's devices), without and
with the box tasks, and of the SigLIP 2 study's '+decoder' arm, counted by
the code of --root (default: this checkout),
so two checkouts compare two versions of the count. Prints JSON.
"""

import argparse
import json
import os
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  args = parser.parse_args()
  sys.path.insert(0, args.root)
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.data import pipeline  # pylint: disable=g-import-not-at-top
  from lit_navit.models import flops  # pylint: disable=g-import-not-at-top
  out = {}
  for name, spec in (('B/16, 4096 rows, 256 groups', 'siglip2_navit.py'),
                     ('B/16, 4096 rows, 256 groups, boxes', 'siglip2_navit.py:boxes')):
    config = config_lib.load_config_file(os.path.join(args.root, 'configs', spec))
    batch = pipeline.batch_spec(config.input, rows=config.batch_size, groups=256,
                                patch_size=config.input.patch_sizes[0])
    out[name] = flops.decoder_forward_flops(config.model, batch)
  # The SigLIP 2 study's '+decoder' arm (EXPERIMENTS.md §5), one group.
  sys.path.insert(0, os.path.join(args.root, 'experiments'))
  import siglip2_losses  # pylint: disable=g-import-not-at-top
  config = siglip2_losses.base_config(100, 0, siglip2_losses.ARMS['+decoder'])
  batch = pipeline.batch_spec(config.input, rows=config.batch_size, groups=1,
                              patch_size=config.input.patch_sizes[0])
  out["study '+decoder'"] = flops.decoder_forward_flops(config.model, batch)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
