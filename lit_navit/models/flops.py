"""Analytic FLOP counts of TwoTowers, for MFU.

Counts 2 FLOPs per multiply-accumulate of every matmul and einsum the model
runs: patch embedding (and its once-per-step PI-resize), resized position
embeddings, q/k/v/out projections, both attention einsums over the full
L x L (T x T) grid the masked kernels compute (the masked-out part of a
packed row is computed and thrown away), MLPs, MAP heads and the projection
heads; with a captioning decoder (decoder.py) also its image projection,
causal self-attention over each text row, cross-attention of one query row
of T slots a caption place (its tokens regrouped there, in either text
layout) to the L tokens of the one image row that holds its image, MLPs
and vocabulary logits, and with its box tasks (model.decoder.box_weight > 0)
the same over one more sequence of T tokens a caption place, in the same
call, and the logits over its larger vocabulary; with model.distill
on, the EMA teacher's forward, the DINO heads and the masked-prediction
pass (`distill_flops`). Element-wise work (LayerNorm, softmax, GELU, masking) and embedding
lookups are left out: they are a few percent at real widths.
"""

from typing import Sequence

from lit_navit.data import batch as batch_lib
from lit_navit.models import decoder as decoder_lib
from lit_navit.models import two_towers
from lit_navit.models import variants


def _encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  per_layer = (2 * tokens * width * 4 * width        # q, k, v, out projections
               + 2 * 2 * tokens * tokens * width     # q k^T and weights v
               + 2 * 2 * tokens * width * mlp_dim)   # MLP
  return depth * per_layer


def _map_head_flops(queries: int, tokens: int, width: int, mlp_dim: int) -> int:
  return (2 * queries * width * 2 * width            # q and out projections
          + 2 * tokens * width * 2 * width           # k, v projections
          + 2 * 2 * queries * tokens * width         # attention
          + 2 * 2 * queries * width * mlp_dim)       # MLP


def image_forward_flops(config, spec: batch_lib.BatchSpec, pooled: bool = True) -> int:
  """Forward FLOPs of the image tower on one batch of `spec`; without
  `pooled`, up to its un-pooled tokens (a pass whose pooling is unused)."""
  c = config.image
  size = variants.tower_size(c, 'image')
  width, mlp_dim = size['width'], size['mlp_dim']
  tokens, slots, p = spec.tokens_per_row, spec.slots, spec.patch_size
  p0 = two_towers.base_patch_size(c)
  per_row = 2 * tokens * 3 * p * p * width
  if c.posemb in ('learn_2d_resized', 'learn_1d_resized'):
    rows, cols = two_towers.posemb_grid(c)
    per_row += 2 * tokens * rows * cols * width
  per_row += _encoder_flops(tokens, width, size['depth'], mlp_dim)
  if pooled and c.pool == 'map':
    per_row += _map_head_flops(slots, tokens, width, mlp_dim)
  if pooled and c.get('head', True):
    per_row += 2 * slots * width * config.embed_dim
  pi_resize = 2 * p * p * p0 * p0 * 3 * width if p != p0 else 0
  return spec.rows * per_row + pi_resize


def text_forward_flops(config, spec: batch_lib.BatchSpec) -> int:
  """Forward FLOPs of the text tower on the G*C caption rows of one batch
  (packed: on its G*R text rows, then pooling and head per caption)."""
  c = config.text
  size = variants.tower_size(c, 'text')
  width, mlp_dim = size['width'], size['mlp_dim']
  tokens = spec.text_len
  rows = spec.text_rows if spec.packed_text else spec.captions
  encoder = rows * _encoder_flops(tokens, width, size['depth'], mlp_dim)
  per_caption = 0
  if c.pool == 'map':  # Packed, over the caption's whole row.
    per_caption += _map_head_flops(1, tokens, width, mlp_dim)
  if c.get('head', True):
    per_caption += 2 * width * config.embed_dim
  return spec.groups * (encoder + spec.captions * per_caption)


def decoder_forward_flops(config, spec: batch_lib.BatchSpec) -> int:
  """Forward FLOPs of the captioning decoder on one batch of `spec` (0 without one)."""
  if not two_towers.has_decoder(config):
    return 0
  c = config.decoder
  width, mlp_dim = c.width, c.mlp_dim
  image_width = variants.tower_size(config.image, 'image')['width']
  image_tokens = spec.rows * spec.tokens_per_row
  length = spec.text_len
  text_rows = spec.groups * (spec.text_rows if spec.packed_text else spec.captions)
  query_rows = spec.groups * spec.captions  # decoder.cross_layout
  if decoder_lib.box_tasks_on(config):  # A box task row a caption place.
    text_rows += spec.groups * spec.captions
    query_rows *= 2
  text_tokens = text_rows * length
  per_layer = (text_rows * _encoder_flops(length, width, 1, mlp_dim)  # self-attn, MLP
               + 2 * text_tokens * width * 2 * width      # cross q, out projections
               + 2 * image_tokens * width * 2 * width     # cross k, v projections
               # cross-attention: a query row's T slots to its image row's L tokens
               + 2 * 2 * query_rows * length * spec.tokens_per_row * width)
  return (2 * image_tokens * image_width * width          # image projection
          + c.depth * per_layer
          + 2 * text_tokens * width * decoder_lib.vocab_size(config))  # logits


def forward_flops(config, spec: batch_lib.BatchSpec) -> int:
  """Forward FLOPs of TwoTowers(config) on one batch of `spec` (both towers
  and the captioning decoder)."""
  return (image_forward_flops(config, spec) + text_forward_flops(config, spec)
          + decoder_forward_flops(config, spec))


def _dino_head_flops(vectors: int, in_dim: int, head) -> int:
  return 2 * vectors * (in_dim * head.hidden_dim + head.hidden_dim * head.hidden_dim
                        + head.hidden_dim * head.bottleneck_dim
                        + head.bottleneck_dim * head.prototypes)


def distill_flops(config, spec: batch_lib.BatchSpec, frozen: Sequence[str] = ()) -> int:
  """The FLOPs model.distill adds to a step from its start_step on: the EMA
  teacher's image tower and heads (forward only) and the student's heads and,
  for masked prediction, its second image-tower pass (forward and backward)."""
  d = config.distill
  if not two_towers.distill_on(config):
    return 0
  width = variants.tower_size(config.image, 'image')['width']
  slot_dim = config.embed_dim if config.image.get('head', True) else width
  backward = 1 if 'img' in frozen else 3
  total = image_forward_flops(config, spec, pooled=d.weight > 0)  # the teacher
  # Each head: the teacher's forward (1) and the student's forward and backward (3).
  if d.weight > 0:
    total += 4 * _dino_head_flops(spec.rows * spec.slots, slot_dim, d.head)
  if d.masked_weight > 0:
    total += 4 * _dino_head_flops(spec.rows * spec.tokens_per_row, width, d.head)
    total += backward * image_forward_flops(config, spec, pooled=False)
  return total


def training_flops(config, spec: batch_lib.BatchSpec,
                   frozen: Sequence[str] = (), distilling: bool = False) -> int:
  """FLOPs of one training step: forward, plus backward = 2 x forward.

  A tower named in `frozen` ('img', 'txt') runs forward only (LiT): nothing
  below it needs a gradient. The captioning decoder always trains.
  `distilling`: a step from model.distill's start_step on
  (`distill_flops`). Remat's recompute is not counted (model FLOPs
  utilisation, not hardware utilisation).
  """
  unknown = set(frozen) - {'img', 'txt'}
  if unknown:
    raise ValueError(f'unknown towers {sorted(unknown)} in frozen; expected img, txt')
  img = image_forward_flops(config, spec)
  txt = text_forward_flops(config, spec)
  extra = distill_flops(config, spec, frozen) if distilling else 0
  return ((img if 'img' in frozen else 3 * img) + (txt if 'txt' in frozen else 3 * txt)
          + 3 * decoder_forward_flops(config, spec) + extra)
