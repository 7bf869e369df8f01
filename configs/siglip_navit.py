"""SigLIP recipe with a NaViT image tower, for pods and GPU clusters.

NaViT-B/16 + text B, sigmoid loss (ring across devices), Adam lr 1e-3,
wd 1e-4, clip 1, linear warmup then cosine; side ~ N_t(-0.5, 1) on
[64, 384] pixels, rows of L=256 tokens.

  python -m lit_navit.train --workdir gs://bucket/run \\
    --config configs/siglip_navit.py:variant=B/16,batch=4096,source=tfrecord,path=gs://bucket/webli-*.tfrecord

Args: variant (image tower), text_variant, batch (global rows), steps,
source (tfrecord | wds | files | synthetic), path, tokenizer (a sentencepiece
.model; c4_en or Gemma models work), vocab (its vocabulary size), loss.
"""

from lit_navit import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, variant='B/16', text_variant='B', batch=4096, steps=100_000,
      source='tfrecord', path='', tokenizer='', vocab=32_000, loss='sigmoid',
      warmup=5_000)
  c = config_lib.default_config()
  c.total_steps = arg.steps
  c.batch_size = arg.batch

  c.input.source.kind = arg.source
  c.input.source.path = arg.path
  if arg.tokenizer:
    c.input.tokenizer = arg.tokenizer
  c.input.tokens_per_row = 256
  c.input.images_per_row = 16
  # Rows hold ~2.8 images at this resolution: encode 2.85 captions a row, not
  # 16 (benchmarks/bench_pipeline.py, groups of 16 rows: 1.0% padding, 3.9%
  # empty caption rows).
  c.input.captions_per_row = 2.85
  c.input.text_len = 64
  # Pack the captions too: WebLI-style captions are far shorter than 64
  # tokens and very uneven, so one a row is mostly padding (78% with the
  # synthetic captions). 0.3 text rows a caption holds 19 tokens a caption
  # on average: set it a little above metrics.jsonl's text_rows_per_caption
  # (the benchmark's 14-token captions: 0.22, 7% padding).
  c.input.text_packing = True
  c.input.text_rows_per_caption = 0.3
  c.input.patch_sizes = (int(arg.variant.split('/')[1]),)
  # Pixels cross to the device as uint8 and are normalised there.
  c.input.patch_dtype = 'uint8'
  c.input.resolution.mode = 'side'
  c.input.resolution.dist = 'truncated_normal'
  c.input.resolution.mean = -0.5
  c.input.resolution.std = 1.0
  c.input.resolution.min = 64
  c.input.resolution.max = 384
  c.input.pack_buffer = 1024
  # Decode and resize in worker processes (threads stop scaling at a few
  # cores); the threads only read and patchify.
  c.input.worker_processes = 32
  c.input.workers = 8

  c.model.image.variant = arg.variant
  c.model.image.pool = 'map'
  c.model.text.variant = arg.text_variant
  c.model.text.vocab_size = arg.vocab
  c.model.text.max_len = 64
  c.model.embed_dim = 768
  c.model.dtype = 'bfloat16'
  # model.f32_grads=True would sum weight gradients over devices in float32:
  # 2.5x the all-reduce bytes of So400m on v5e-256 (BENCHMARKS.md).
  c.model.loss = arg.loss
  c.model.image.remat_policy = 'nothing_saveable'
  c.model.text.remat_policy = 'nothing_saveable'

  c.optim.optax_name = 'adam'
  c.optim.optax = dict(b1=0.9, b2=0.95)
  c.optim.lr = 1e-3
  c.optim.wd = 1e-4
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = [('.*', dict(decay_type='cosine', warmup_steps=arg.warmup))]

  c.mesh = [('data', -1), ('fsdp', 1)]
  # With fsdp, shard attention kernels over their heads, not their width:
  # XLA on TPU then reduce-scatters their gradients instead of all-reducing
  # them whole (0.5 GiB a step per chip at So400m on v5e-256, BENCHMARKS.md).
  c.sharding_rules = [('.*/(query|key|value)/kernel', 'fsdp:-2'),
                      ('.*/out/kernel', 'fsdp:-3'), ('.*', 'fsdp')]
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = 10_000
  c.log_every = 50
  return c
