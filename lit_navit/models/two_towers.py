"""The two-tower image-text model (SigLIP / CLIP / LiT) and its config.

Parameters: 'img' (NaViT), 'txt' (text transformer), 't' (log temperature)
and, for the sigmoid loss, 'b' (logit bias), as in big_vision; with
`decoder.weight` > 0 also 'dec', the LocCa captioning decoder (decoder.py),
which reads the image tower's tokens of the same forward pass (and with
`decoder.box_weight` > 0 also trains LocCa's box tasks). With
model.distill on: 'distill_head' (self-distillation) and 'patch_head'
(masked prediction), DINO heads that lit_navit/distill.py runs, and
'img/mask_token' (masked prediction).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lit_navit.data import batch as batch_lib
from lit_navit.models import decoder as decoder_lib
from lit_navit.models import distill_head
from lit_navit.models import navit
from lit_navit.models import text
from lit_navit.models import variants

LOSSES = ('sigmoid', 'softmax')
# Initial log temperature when config `t_init` is unset: SigLIP's 10, CLIP's 1/0.07.
DEFAULT_T_INIT = {'sigmoid': math.log(10.0), 'softmax': math.log(1 / 0.07)}


def default_config() -> ml_collections.ConfigDict:
  """SigLIP B/16 with a NaViT image tower. Sizes come from the `variant` strings."""
  c = ml_collections.ConfigDict()
  size = lambda: dict(  # Explicit sizes; each one set overrides the variant's.
      width=ml_collections.config_dict.placeholder(int),
      depth=ml_collections.config_dict.placeholder(int),
      mlp_dim=ml_collections.config_dict.placeholder(int),
      num_heads=ml_collections.config_dict.placeholder(int))
  c.image = ml_collections.ConfigDict(dict(
      variant='B/16',
      **size(),
      # Patch size the embedding kernel is stored at; unset: the variant's.
      base_patch_size=ml_collections.config_dict.placeholder(int),
      posemb='learn_factorized',  # See models/posemb.py KINDS.
      # Position table side, in patches; for learn_2d_resized and
      # learn_1d_resized the learned grid's side (NaFlex: 16; its cost grows
      # with max_grid**2).
      max_grid=64,
      # (rows, cols) of a rectangular learn_*_resized grid; unset: max_grid square.
      posemb_grid=ml_collections.config_dict.placeholder(tuple),
      pool='map',                 # 'map' | 'mean' | 'max'.
      stem='conv',                # Patch kernel stored 'conv' [p,p,3,W] | 'dense' [p*p*3,W].
      head=True,                  # A linear head to embed_dim; False: width is embed_dim.
      qk_norm=False,
      use_bias=True,
      scan=True,
      # encoder.REMAT_POLICIES; 'weights_saveable' keeps the fsdp-gathered
      # weights for the backward pass instead of gathering them again.
      remat_policy='none',
      attention='dense',          # 'dense' | 'xla' | 'cudnn' | 'splash' (TPU).
  ))
  c.text = ml_collections.ConfigDict(dict(
      variant='B',
      **size(),
      vocab_size=32_000,
      max_len=64,
      pool='last',                # 'last' | 'first' | 'map' | 'mean' | 'max'.
      causal=False,
      pad_id=0,
      # False: big_vision's text tower (attends to padding, 'last' pools
      # position T-1); see models/text.py.
      mask_padding=True,
      head=True,                  # As image.head.
      qk_norm=False,
      use_bias=True,
      scan=True,
      remat_policy='none',
      attention='dense',
  ))
  c.embed_dim = 768
  c.dtype = 'float32'             # Compute dtype; parameters stay float32.
  # With a bfloat16 dtype: the encoders' weight gradients come out of their
  # matmuls, and are summed over devices, in float32 (models/precision.py).
  c.f32_grads = False
  c.loss = 'sigmoid'              # 'sigmoid' | 'softmax': which of t, b to init how.
  # Initial log temperature; unset: log 10 (sigmoid) or log(1/0.07) (softmax).
  c.t_init = ml_collections.config_dict.placeholder(float)
  c.b_init = -10.0                # Initial logit bias (sigmoid only).
  # LocCa captioning loss (weight 0: off, no decoder params); its compute
  # dtype is `dtype`, its caption length the text tower's, its vocabulary the
  # text tower's (with box_weight > 0, plus the box tasks' tokens).
  c.decoder = decoder_lib.default_config()
  # SILC self-distillation and TIPS masked prediction against an EMA teacher
  # of the image tower (lit_navit/distill.py, lit_navit/teacher.py). Each is
  # off at weight 0; both off: no extra params, no teacher in the state.
  c.distill = ml_collections.ConfigDict(dict(
      weight=0.0,          # Local crops (image/parent) vs the teacher's global view.
      masked_weight=0.0,   # Masked tokens (image/masked) vs the teacher's patch features.
      # Both losses, and the teacher forward, run from this step on (SigLIP 2:
      # 80% of training); the EMA follows the student from step 0.
      start_step=0,
      ema_momentum=0.996,  # teacher <- m * teacher + (1 - m) * student, every step.
      # DINO head: MLP of hidden_dim -> L2-normalised bottleneck -> prototypes.
      head=ml_collections.ConfigDict(dict(hidden_dim=2048, bottleneck_dim=256,
                                          prototypes=65536)),
      teacher_temp=0.04,   # Sharpens the teacher's (centred) softmax.
      student_temp=0.1,
      center_momentum=0.9,  # EMA of the teacher's batch-mean logits.
  ))
  return c


def distill_on(config) -> bool:
  """Whether either teacher objective is on (model config)."""
  d = config.get('distill')
  return d is not None and (d.weight > 0 or d.masked_weight > 0)


def check_distill(config) -> None:
  """Raises ValueError naming the model.distill key whose value is bad."""
  d = config.distill
  values = {**{k: v for k, v in d.items() if k != 'head'},
            **{f'head.{k}': v for k, v in d.head.items()}}
  checks = [
      ('weight', lambda v: v >= 0, 'must be >= 0 (0 turns it off)'),
      ('masked_weight', lambda v: v >= 0, 'must be >= 0 (0 turns it off)'),
      ('start_step', lambda v: v >= 0, 'must be >= 0'),
      ('ema_momentum', lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
      ('center_momentum', lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
      ('teacher_temp', lambda v: v > 0, 'must be > 0'),
      ('student_temp', lambda v: v > 0, 'must be > 0'),
      ('head.hidden_dim', lambda v: v >= 1, 'must be >= 1'),
      ('head.bottleneck_dim', lambda v: v >= 1, 'must be >= 1'),
      ('head.prototypes', lambda v: v >= 1, 'must be >= 1'),
  ]
  for key, ok, why in checks:
    if not ok(values[key]):  # a NaN fails every check
      raise ValueError(f'config key model.distill.{key}={values[key]!r}: {why}')


def base_patch_size(image_config) -> int:
  """`image.base_patch_size`, or else the patch size in `image.variant`."""
  size = image_config.base_patch_size
  if size is None:
    size = variants.decode(image_config.variant).get('patch_size')
  if size is None:
    raise ValueError(f'image.variant {image_config.variant!r} names no patch '
                     'size and image.base_patch_size is unset')
  return size


def _out_dim(config, tower: str, width: int) -> int | None:
  """embed_dim for a tower with a head; None (no head) if its width already is."""
  if config[tower].get('head', True):
    return config.embed_dim
  if width != config.embed_dim:
    raise ValueError(f'{tower}.head=False needs {tower} width {width} == '
                     f'embed_dim {config.embed_dim}')
  return None


def posemb_grid(image_config) -> tuple[int, int]:
  """(rows, cols) of the image posemb grid: `posemb_grid`, else max_grid square."""
  grid = image_config.get('posemb_grid')
  return tuple(int(g) for g in grid) if grid else (image_config.max_grid,) * 2


def image_tower(config) -> navit.NaViT:
  """The NaViT described by `config.image`, projecting to `config.embed_dim`;
  with a learned mask token when masked prediction is on."""
  c = config.image
  distill = config.get('distill')
  size = variants.tower_size(c, 'image')
  return navit.NaViT(
      **size, base_patch_size=base_patch_size(c), posemb=c.posemb,
      max_grid=c.max_grid, pool=c.pool,
      out_dim=_out_dim(config, 'image', size['width']),
      qk_norm=c.qk_norm, use_bias=c.use_bias, attention=c.attention,
      scan=c.scan, remat_policy=c.remat_policy, dtype=jnp.dtype(config.dtype),
      stem=c.get('stem', 'conv'), posemb_grid=posemb_grid(c),
      mask_token=distill is not None and distill.masked_weight > 0)


def distill_heads(config) -> dict:
  """{'distill_head': ..., 'patch_head': ...}: the DINO heads of the objectives
  that are on, keyed by their name in the params."""
  d = config.get('distill')
  if d is None:
    return {}
  head = lambda: distill_head.DINOHead(d.head.hidden_dim, d.head.bottleneck_dim,
                                       d.head.prototypes, jnp.dtype(config.dtype))
  heads = {}
  if d.weight > 0:
    heads['distill_head'] = head()
  if d.masked_weight > 0:
    heads['patch_head'] = head()
  return heads


# Params only SigLIP 2's training objectives use: the captioning decoder,
# the DINO heads and the masked-prediction mask token. Embedding images or
# text never reads them, and big_vision's and transformers' SigLIP lack them.
TRAINING_ONLY = ('dec', 'distill_head', 'patch_head', 'img/mask_token')


def without_training_only(params) -> dict:
  """`params` of the two towers alone (the TRAINING_ONLY paths dropped)."""
  def keep(tree, prefix):
    return {k: keep(v, f'{prefix}{k}/') if hasattr(v, 'items') else v
            for k, v in tree.items() if f'{prefix}{k}' not in TRAINING_ONLY}
  return keep(params, '')


def text_tower(config) -> text.TextTransformer:
  """The text transformer described by `config.text`, projecting to `config.embed_dim`."""
  c = config.text
  size = variants.tower_size(c, 'text')
  return text.TextTransformer(
      vocab_size=c.vocab_size, max_len=c.max_len, **size, pool=c.pool,
      out_dim=_out_dim(config, 'text', size['width']), causal=c.causal,
      pad_id=c.pad_id, mask_padding=c.get('mask_padding', True),
      qk_norm=c.qk_norm, use_bias=c.use_bias, attention=c.attention,
      scan=c.scan, remat_policy=c.remat_policy, dtype=jnp.dtype(config.dtype))


def has_decoder(config) -> bool:
  """Whether `config` (model) trains a captioning decoder."""
  return 'decoder' in config and config.decoder.weight > 0


def caption_decoder(config) -> decoder_lib.CaptionDecoder:
  """The captioning decoder of `config.decoder` (its vocabulary:
  `decoder.vocab_size`)."""
  c = config.decoder
  return decoder_lib.CaptionDecoder(
      vocab_size=decoder_lib.vocab_size(config), max_len=config.text.max_len,
      width=c.width, depth=c.depth, mlp_dim=c.mlp_dim, num_heads=c.num_heads,
      pad_id=config.text.pad_id, attention=c.attention,
      dtype=jnp.dtype(config.dtype))


def l2_normalize(x, eps: float = 1e-12):
  """x / |x| along the last axis; zero stays zero, with finite gradients."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TwoTowers(nn.Module):
  """Image and text towers into one L2-normalised embedding space.

  `config` is a ConfigDict from `default_config()` (possibly overridden).
  """
  config: ml_collections.ConfigDict

  def setup(self):
    if self.config.loss not in LOSSES:
      raise ValueError(f'unknown loss {self.config.loss!r}; expected one of {LOSSES}')
    self.img = image_tower(self.config)
    self.txt = text_tower(self.config)
    if 'decoder' in self.config:
      decoder_lib.check_config(self.config)
    if has_decoder(self.config):
      self.dec = caption_decoder(self.config)
    t_init = self.config.t_init
    if t_init is None:
      t_init = DEFAULT_T_INIT[self.config.loss]
    self.t = self.param('t', nn.initializers.constant(t_init), (1,), jnp.float32)
    if self.config.loss == 'sigmoid':
      self.b = self.param('b', nn.initializers.constant(self.config.b_init),
                          (1,), jnp.float32)
    if self.config.get('distill') is not None:
      check_distill(self.config)
    # The distillation heads: params of the model, run by lit_navit/distill.py.
    heads = distill_heads(self.config)
    self.distill_head = heads.get('distill_head')
    self.patch_head = heads.get('patch_head')

  def embed_images(self, batch):
    """Packed image batch -> L2-normalised z_img [B*E, embed_dim] (zero for empty slots)."""
    z = self._slot_embeddings(batch)
    return l2_normalize(z.reshape(-1, z.shape[-1]))

  def _slot_embeddings(self, batch, return_tokens: bool = False):
    """Unnormalised per-slot image embeddings [B, E, D] (and, with
    `return_tokens`, the encoder's tokens [B, L, width])."""
    return self.img(batch['image/patches'], batch['image/yx'],
                    batch['image/segment'], batch['image/grid'],
                    return_tokens=return_tokens)

  def decoder_cross_entropy(self, image_tokens, batch, caption_key=None):
    """The decoder's per-token (cross-entropy float32, targets bool):
    {'caption': of the text rows [G, N, T]} and, with the box tasks on and
    box/* in the batch (train batches), 'box': of the box rows [G, C, T].
    `caption_key` draws the CapPa parallel captions (None: none, as in
    evaluation)."""
    parallel = None
    fraction = self.config.decoder.parallel_fraction
    if caption_key is not None and fraction > 0:
      parallel = jax.random.bernoulli(caption_key, fraction,
                                      batch['text/valid'].shape)
    boxes = (decoder_lib.box_sequences(batch)
             if decoder_lib.box_tasks_on(self.config) else None)
    layout = decoder_lib.caption_layout(batch, self.config.text.pad_id)
    ce, targets = self.dec(
        image_tokens, batch['image/segment'], batch['image/grid'].shape[1],
        layout, batch['text/slot'], batch['text/valid'], parallel, boxes)
    rows = layout.tokens.shape[1]  # The caption rows come first.
    out = {'caption': (ce[:, :rows], targets[:, :rows])}
    if boxes is not None:
      out['box'] = (ce[:, rows:], targets[:, rows:])
    return out

  def box_logits(self, image_tokens, batch, box_tokens):
    """The decoder's float32 logits [G, C, T, vocab] of the box rows of a
    batch with box/* (box_tasks_on), their tokens replaced by `box_tokens`
    [G, C, T]: teacher-forced, so position t reads tokens < t only (greedy
    decoding, evaluate/referring.py). The caption rows run beside them, as
    in training, and are dropped."""
    boxes = decoder_lib.box_sequences(batch)._replace(tokens=box_tokens)
    layout = decoder_lib.caption_layout(batch, self.config.text.pad_id)
    logits = self.dec(
        image_tokens, batch['image/segment'], batch['image/grid'].shape[1],
        layout, batch['text/slot'], batch['text/valid'], None, boxes,
        return_logits=True)
    return logits[:, layout.tokens.shape[1]:]

  def caption_cross_entropy(self, image_tokens, batch, caption_key=None):
    """The captions' (cross-entropy, targets) [G, N, T] of `decoder_cross_entropy`."""
    return self.decoder_cross_entropy(image_tokens, batch, caption_key)['caption']

  def decoder_loss(self, image_tokens, batch, caption_key=None):
    """{'caption_loss': mean token cross-entropy, 'caption_targets': the
    tokens it averages} and, with box rows, 'box_loss' and 'box_targets' alike."""
    out = {}
    for name, (ce, targets) in self.decoder_cross_entropy(
        image_tokens, batch, caption_key).items():
      count = jnp.sum(targets)
      out[f'{name}_loss'] = jnp.sum(ce) / jnp.maximum(count, 1)
      out[f'{name}_targets'] = count
    return out

  def embed_texts(self, tokens):
    """Tokens int [..., T] -> L2-normalised z_txt [prod(...), embed_dim]."""
    z = self.txt(tokens.reshape(-1, tokens.shape[-1]))
    return l2_normalize(z)

  def __call__(self, batch, train: bool = False, caption_key=None):
    """Returns (z_img [G*C, D], z_txt [G*C, D], extras), one row per caption row.

    Only the batch's caption rows (or, packed, text rows) are encoded; each image embedding is
    gathered, within its group, to its caption's row. extras: 't' (the
    temperature exp(t)), 'b' (the bias; sigmoid loss only) and 'valid' bool
    [G*C], the rows that hold a pair; with a decoder, those of
    `decoder_loss` (`caption_key` as there). The model has no dropout, so
    `train` changes nothing; it is accepted so trainers call every model alike.
    """
    del train
    extras = {'t': jnp.exp(self.t[0]), 'valid': batch['text/valid'].reshape(-1)}
    if self.config.loss == 'sigmoid':
      extras['b'] = self.b[0]
    if has_decoder(self.config):
      slots, tokens = self._slot_embeddings(batch, return_tokens=True)
      extras.update(self.decoder_loss(tokens, batch, caption_key))
    else:
      slots = self._slot_embeddings(batch)
    extras['slots'] = slots
    if self.is_initializing():  # the heads' params; distill.py runs them
      self._init_heads(slots)
    zimg = gather_to_captions(slots, batch['text/slot'])
    if 'text/segment' in batch:
      ztxt = l2_normalize(self.txt(*packed_text(batch)))
    else:
      ztxt = self.embed_texts(batch['text/tokens'])
    return l2_normalize(zimg), ztxt, extras


  def _init_heads(self, slots):
    if self.distill_head is not None:
      self.distill_head(slots)
    if self.patch_head is not None:
      width = variants.tower_size(self.config.image, 'image')['width']
      self.patch_head(jnp.zeros((1, width), slots.dtype))


def packed_text(batch):
  """(text rows [G, R, T], text.Packed) of a batch with packed captions."""
  return batch['text/tokens'], text.Packed(
      batch['text/segment'], batch['text/position'], batch['text/row'],
      batch['text/row_segment'])


def gather_to_captions(slots, caption_slot):
  """Per-slot rows [B, E, D] -> the rows of each caption [G*C, D].

  `caption_slot` int [G, C] indexes the flat slots of each group of B/G
  rows; the gather is batched over groups, so with groups split over
  devices like the rows it stays on each device.
  """
  groups = caption_slot.shape[0]
  by_group = slots.reshape(groups, -1, slots.shape[-1])
  gathered = jnp.take_along_axis(by_group, caption_slot[..., None], axis=1)
  return gathered.reshape(-1, slots.shape[-1])


def dummy_batch(spec: batch_lib.BatchSpec) -> dict:
  """Abstract arrays of a batch's model inputs, for init and eval_shape."""
  return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.shapes().items()
          if k != 'index'}


def param_shapes(config, spec: batch_lib.BatchSpec | None = None):
  """Parameter shapes (ShapeDtypeStructs) of TwoTowers(config); allocates nothing."""
  if spec is None:
    # Parameters do not depend on the batch's shapes: use the smallest.
    spec = batch_lib.BatchSpec(rows=1, tokens_per_row=1, slots=1, text_len=1,
                               patch_size=base_patch_size(config.image))
  return jax.eval_shape(TwoTowers(config).init, jax.random.key(0), dummy_batch(spec))


def param_count(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
