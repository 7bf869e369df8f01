"""CPU demo: a tiny SigLIP two-tower model on the synthetic shapes source.

Trains on 2 CPU cores in a few minutes and learns shape and colour well
enough to classify shape-colour combinations it never saw in a caption.

  python -m lit_navit.train --config configs/demo.py --workdir /tmp/demo
  python -m lit_navit.train --config configs/demo.py:steps=100 --workdir /tmp/demo
"""

from lit_navit import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1200, batch=16, seed=0)
  c = config_lib.default_config()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.batch_size = arg.batch  # rows of 128 tokens, ~6 images each

  c.input.source.kind = 'synthetic'
  c.input.source.size = 200_000
  c.input.source.split = 'train'
  c.input.source.min_side = 32
  c.input.source.max_side = 160
  c.input.tokens_per_row = 128
  c.input.images_per_row = 12
  # Rows hold ~7.4 images: encode 7.5 captions a row, not 12 (0.8% padding,
  # 2.5% empty caption rows).
  c.input.captions_per_row = 7.5
  c.input.text_len = 16
  c.input.patch_sizes = (8,)
  c.input.resolution.mode = 'side'
  c.input.resolution.dist = 'uniform'
  c.input.resolution.min = 24
  c.input.resolution.max = 64
  c.input.pack_buffer = 384
  c.input.workers = 2

  c.model.image.variant = 'mu/8'
  c.model.image.max_grid = 16
  c.model.text.variant = 'mu'
  c.model.text.vocab_size = 512
  c.model.text.max_len = 16
  c.model.embed_dim = 64
  c.model.loss = 'sigmoid'

  c.optim.lr = 3e-3
  c.optim.wd = 1e-4
  c.optim.schedule = [('.*', dict(decay_type='cosine', warmup_steps=50))]

  c.evals.every = 400
  c.evals.heldout.kind = 'synthetic'
  c.evals.heldout.seed = 1
  c.evals.heldout.min_side = c.input.source.min_side
  c.evals.heldout.max_side = c.input.source.max_side

  c.checkpoint.every = 200
  c.checkpoint.keep = 2
  c.log_every = 10
  return c
