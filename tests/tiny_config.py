"""A config small enough to train a few steps in seconds, for trainer tests."""

from lit_navit import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=8, every=4, batch=8, loss='sigmoid', seed=0,
                             fsdp=1, patch_sizes='8')
  c = config_lib.default_config()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.input.source.kind = 'synthetic'
  c.input.source.size = 400
  c.input.source.max_side = 64
  c.input.tokens_per_row = 32
  c.input.images_per_row = 4
  c.input.text_len = 8
  c.input.patch_sizes = tuple(int(p) for p in arg.patch_sizes.split('/'))
  c.input.resolution.min = 16
  c.input.resolution.max = 32
  c.input.pack_buffer = 48
  c.input.workers = 0
  c.model.image.variant = 'mu/8'
  c.model.image.max_grid = 8
  c.model.text.variant = 'mu'
  c.model.text.vocab_size = 512
  c.model.text.max_len = 8
  c.model.embed_dim = 16
  c.model.loss = arg.loss
  c.mesh = [('data', -1), ('fsdp', arg.fsdp)]
  c.optim.schedule = [('.*', dict(decay_type='cosine', warmup_steps=2))]
  c.checkpoint.every = arg.every
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  return c
