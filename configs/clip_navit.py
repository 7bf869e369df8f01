"""The SigLIP NaViT recipe with CLIP's softmax loss (gathered, open_clip style).

  python -m lit_navit.train --workdir DIR \\
    --config configs/clip_navit.py:variant=B/16,batch=4096,path=...

Takes the same args as configs/siglip_navit.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import siglip_navit  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  arg = f'loss=softmax,{arg}' if arg else 'loss=softmax'
  return siglip_navit.get_config(arg)
