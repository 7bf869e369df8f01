"""SigLIP 2's training recipe on packed NaViT rows (arXiv 2502.14786).

configs/siglip_navit.py (sigmoid loss, packed images and captions) plus the
three objectives SigLIP 2 adds:

- a LocCa captioning decoder on the image tokens, from the first step
  (`model.decoder`; SigLIP 2 weighs it 1), and with `boxes` (a source with
  boxes; WebLI-style sources have none) LocCa's referring expressions and
  grounded captioning on the same decoder (`model.decoder.box_weight`,
  `input.box_tasks`);
- SILC self-distillation: an EMA teacher of the image tower sees each image,
  the student its local crops, packed into the same rows
  (`model.distill.weight`, `input.local_crops`);
- TIPS masked prediction: the student predicts the teacher's patch
  features where half of each image's patches are masked
  (`model.distill.masked_weight`, `input.mask_ratio`);

the last two over the final 20% of training (`model.distill.start_step`).

  python -m lit_navit.train --workdir gs://bucket/run \\
    --config configs/siglip2_navit.py:variant=B/16,batch=4096,source=tfrecord,path=gs://bucket/webli-*.tfrecord

Args: those of siglip_navit.py, plus crops (local crops an image),
distill_from (the fraction of training after which the teacher's objectives
start) and boxes (train the box tasks: the source provides boxes).
"""

import os

from lit_navit import config as config_lib

SIGLIP_ARGS = ('variant', 'text_variant', 'batch', 'steps', 'source', 'path',
               'tokenizer', 'vocab', 'loss', 'warmup')


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, variant='B/16', text_variant='B', batch=4096, steps=100_000,
      source='tfrecord', path='', tokenizer='', vocab=32_000, loss='sigmoid',
      warmup=5_000, crops=2, distill_from=0.8, boxes=False)
  # configs/siglip_navit.py's config, loaded from beside this file (as
  # clip_navit.py does: importing it would put configs/ on sys.path).
  c = config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), 'siglip_navit.py') + ':' + ','.join(
          f'{k}={arg[k]}' for k in SIGLIP_ARGS if arg[k] != ''))

  c.model.decoder.weight = 1.0
  if arg.boxes:
    c.input.box_tasks = True
    c.model.decoder.box_weight = 1.0

  c.model.distill.weight = 1.0
  c.model.distill.masked_weight = 0.25
  c.model.distill.start_step = int(arg.distill_from * arg.steps)
  c.input.local_crops.count = arg.crops
  c.input.local_crops.max_tokens = 16
  c.input.mask_ratio = 0.5
  # An image and its crops take ~91 + 16 * crops tokens of a 256-token row
  # (siglip_navit's 2.85 images a row), so fewer images, and captions, fit.
  c.input.captions_per_row = round(2.85 * 91 / (91 + 16 * arg.crops), 2)
  return c
