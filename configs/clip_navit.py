"""The SigLIP NaViT recipe with CLIP's softmax loss (gathered, open_clip style).

  python -m lit_navit.train --workdir DIR \\
    --config configs/clip_navit.py:variant=B/16,batch=4096,path=...

Takes the same args as configs/siglip_navit.py.
"""

import os

from lit_navit import config as config_lib


def _siglip_config(arg):
  """configs/siglip_navit.py's config, loaded from beside this file (not
  imported: its folder on sys.path would shadow the lit_navit package)."""
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), 'siglip_navit.py') + f':{arg or ""}')


def get_config(arg=None):
  arg = f'loss=softmax,{arg}' if arg else 'loss=softmax'
  return _siglip_config(arg)
