"""LiT: a locked image tower, a text tower trained from scratch to match it.

Locking a tower is two lines: the image tower's schedule is None (frozen: no
update, no optimizer state) and its weights come from a checkpoint. Lock the
text tower instead with `locked=txt`.

  python -m lit_navit.train --workdir DIR \\
    --config configs/lit_navit.py:variant=B/16,batch=4096,path=...,init=/ckpts/siglip_b16

The locked tower's config (sizes, stem, posemb, pooling, head) comes from
`init`: from a workdir's saved config (a run, or a big_vision or
transformers import) with its patch sizes or tokenizer settings, or read
off the arrays of a big_vision SigLIP / SigLIP 2 .npz with its patch size
or caption length. embed_dim becomes the tower's output width.

Args: those of configs/siglip_navit.py, plus locked (img | txt) and init (a
workdir, step directory or big_vision .npz whose params initialise the model).
"""

import os

from lit_navit import config as config_lib
from lit_navit.interop import big_vision
from lit_navit.interop import workdir


def _siglip_config(arg):
  """configs/siglip_navit.py's config, loaded from beside this file (not
  imported: its folder on sys.path would shadow the lit_navit package)."""
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), 'siglip_navit.py') + f':{arg or ""}')


def get_config(arg=None):
  lit_args = dict(locked='img', init='')
  own = [kv for kv in (arg or '').split(',') if kv.split('=')[0] in lit_args]
  rest = [kv for kv in (arg or '').split(',') if kv and kv not in own]
  lit = config_lib.parse_arg(','.join(own), **lit_args)
  c = _siglip_config(','.join(rest))
  c.init_from = lit.init
  c.init_params = f'{lit.locked}/.*'
  c.optim.schedule = [(f'{lit.locked}/.*', None),
                      ('.*', dict(decay_type='cosine', warmup_steps=5_000))]
  if lit.init.endswith('.npz'):
    big_vision.adopt_tower(c, lit.init, lit.locked)
  elif lit.init:
    workdir.adopt_tower(c, lit.init, lit.locked)
  return c
