"""LocCa captioning decoder on packed rows: teacher-forced next-token loss.

A small pre-LN transformer decoder reads each pair's caption and
cross-attends to its image's un-pooled tokens (NaViT `return_tokens`, the
same image forward as the contrastive loss). Both text layouts of batch.py
work: one caption a row (`text/tokens` [G, C, T]) and packed text rows
([G, R, T] with `text/segment`, `text/position`, `text/row`,
`text/row_segment`). `caption_layout` turns either into per-token arrays;
everything after it is layout-free.

Masks, all segment ids except the causal part:
  self-attention   tokens of one caption of a text row (its segment), causal
                   by position in the row, which within one caption is its
                   position in the caption; a CapPa caption is non-causal.
  cross-attention  gathered (`cross_layout`): a caption's image is one slot
                   of one image row (`text/slot` = r*E + k), so its tokens
                   read that row's L tokens only, not the group's B/G*L. Its
                   query row: one row of T slots a caption place (then one
                   a box task), the caption's token at position t in slot t;
                   keys and values are projected once per image row, then
                   gathered per query row. Inside the row the ids are
                   segments: image tokens of slot k have k + 1 (padding 0),
                   the caption's tokens k + 1: a caption sees exactly its own
                   image. Empty query slots take the id of the row's first
                   token, so that no query row is empty; tokens of no valid
                   caption or task get a zero cross-attention output. Every
                   gather is batched over groups, so with groups split over
                   devices nothing crosses devices.
                   Why query rows a caption place: in the packed text
                   layout a text row holds captions of several images, often
                   in different image rows, so a text row has no one image
                   row; a per-token gather of keys would hold T copies of
                   every image row. Regrouped, a caption's tokens are moved
                   into its place's row (a gather of q, and of the output
                   back: no FLOPs), and the cost is C*T query slots a group
                   instead of R*T text tokens (C/R times the packed text's,
                   the empty slots computed and thrown away) and the keys
                   and values of one image row per query row (C rows a group
                   instead of B/G: memory, no FLOPs). With one caption a row
                   the regrouping is the identity permutation. Per layer the
                   scores fall from N*T x B/G*L to Q*T x L a group (Q = C, 2C
                   with box tasks).
Teacher forcing: the input at a caption's position 0 is a learned BOS, at t
its token t-1; the targets are its tokens (pad excluded). CapPa (parallel
prediction): a caption drawn parallel gets a learned [MASK] at every
position and attends to its whole self, predicting every token at once.
The loss is the mean float32 cross-entropy over the real targets of valid
captions (`text/valid`).

LocCa's box tasks (`box_weight` > 0; token format in data/boxes.py): caption
place c's box task sequence (`box/tokens` [G, C, T], one a row) runs in the
same call as the captions, as C more rows of each group: the same params,
teacher forcing and causal self-attention over its whole row, and the
cross-attention id of its place's slot (`text/slot`), so it too sees only its
own image. Its targets are explicit (`box/target` of places with
`box/valid`): a task's prompt is input, not target. The vocabulary then has
the location and task tokens after the text tower's (`BoxFormat.vocab_size`).

Self-attention needs a mask array (causal), which the splash kernel does not
take: with attention 'splash' it runs the dense kernel (T x T per text row,
small); the cross-attention runs the configured kernel on the gathered
query rows ([G*Q, T] queries against [G*Q, L] keys, segment ids). Splash
takes them only where 128 divides both T and L (its kv tiles, and its
backward's q tiles, are multiples of 128): else, as with LocCa's T = 64, the
cross-attention too runs dense, a [T, L] grid a query row, where splash's
block skipping had little left to skip (only the row's other images).
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lit_navit.data import boxes as boxes_lib
from lit_navit.models import attention as attention_lib
from lit_navit.models import encoder
from lit_navit.models import partitioning
from lit_navit.models import precision


def default_config() -> ml_collections.ConfigDict:
  """`model.decoder`: off (weight 0) by default, and then it has no params."""
  return ml_collections.ConfigDict(dict(
      weight=0.0,          # Caption loss weight in the total loss; 0: no decoder.
      # LocCa's decoder is a fraction of the text tower (B: 6 of 12 layers).
      width=384,
      depth=2,
      mlp_dim=1536,
      num_heads=6,
      parallel_fraction=0.0,  # CapPa: share of captions predicted in parallel.
      attention='dense',   # The cross-attention's kernel (attention.py).
      # LocCa's box tasks (ARef, GCap) on this decoder; weight 0: off, and the
      # vocabulary is the text tower's. Needs input.box_tasks (config.py).
      box_weight=0.0,
      box_bins=500,        # Location tokens: bins of a normalised coordinate.
  ))


def box_tasks_on(config) -> bool:
  """Whether `config` (model) trains the box tasks on its decoder."""
  return ('decoder' in config and config.decoder.weight > 0
          and config.decoder.box_weight > 0)


def vocab_size(config) -> int:
  """The decoder's vocabulary (model config): the text tower's, and with the
  box tasks their location and task tokens after it."""
  if box_tasks_on(config):
    return boxes_lib.format_of_model(config).vocab_size
  return config.text.vocab_size


def check_config(config) -> None:
  """ValueError naming the `model.decoder` key whose value is unusable."""
  c = config.decoder
  if not c.weight >= 0:
    raise ValueError(f'config key model.decoder.weight must be >= 0, got {c.weight}')
  if not 0 <= c.parallel_fraction <= 1:
    raise ValueError('config key model.decoder.parallel_fraction must be in '
                     f'[0, 1], got {c.parallel_fraction}')
  for key in ('width', 'depth', 'mlp_dim', 'num_heads'):
    if c[key] < 1:
      raise ValueError(f'config key model.decoder.{key} must be >= 1, got {c[key]}')
  if c.width % c.num_heads:
    raise ValueError(f'config key model.decoder.width={c.width} is not divisible '
                     f'by model.decoder.num_heads={c.num_heads}')
  if not c.box_weight >= 0:
    raise ValueError(f'config key model.decoder.box_weight must be >= 0, got {c.box_weight}')
  if c.box_weight > 0 and not c.weight > 0:
    raise ValueError('config key model.decoder.box_weight > 0 needs the decoder: '
                     'set model.decoder.weight > 0 too')
  if c.box_bins < 1:
    raise ValueError(f'config key model.decoder.box_bins must be >= 1, got {c.box_bins}')
  if c.attention not in attention_lib.ATTENTION_FNS:
    raise ValueError(f'config key model.decoder.attention={c.attention!r}: expected '
                     f'one of {sorted(attention_lib.ATTENTION_FNS)}')


class CaptionLayout(NamedTuple):
  """Per text token, int [G, N, T] (N = C caption rows, or R text rows).

  tokens: the text rows as they are; position: in its caption; segment: its
  caption within the row (0 = padding); caption: its caption place c in the
  group, -1 for padding.
  """
  tokens: Any
  position: Any
  segment: Any
  caption: Any


def caption_layout(batch, pad_id: int) -> CaptionLayout:
  """The per-token layout of either text layout of a batch."""
  tokens = batch['text/tokens']
  groups, rows, length = tokens.shape
  if 'text/segment' not in batch:
    # A caption is its tokens up to its last non-pad one, at least one
    # (batch.py), as packed; the pad after it is no part of it.
    at = jnp.arange(length)
    last = jnp.max(jnp.where(tokens != pad_id, at, 0), axis=-1, keepdims=True)
    segment = (at <= last).astype(jnp.int32)
    caption = jnp.where(segment > 0, jnp.arange(rows)[:, None], -1)
    return CaptionLayout(tokens, jnp.broadcast_to(at, tokens.shape), segment,
                         jnp.broadcast_to(caption, tokens.shape))
  segment, row, row_segment = (batch[k] for k in (
      'text/segment', 'text/row', 'text/row_segment'))
  # Which caption place each (row, segment) of a group holds: a table
  # scattered from the places, then read per token. Empty places (segment
  # 0) write out of bounds, so padding reads -1.
  places = row.shape[1]
  where = jnp.where(row_segment > 0, row * (length + 1) + row_segment,
                    rows * (length + 1))
  table = jax.vmap(lambda w: jnp.full(rows * (length + 1), -1, jnp.int32).at[w].set(
      jnp.arange(places, dtype=jnp.int32), mode='drop'))(where)
  token_place = jnp.arange(rows)[:, None] * (length + 1) + segment
  caption = jnp.take_along_axis(table, token_place.reshape(groups, -1), axis=1)
  return CaptionLayout(tokens, batch['text/position'], segment,
                       caption.reshape(tokens.shape))


def per_caption(values, caption):
  """values [G, C] read at each token's caption place [G, N, T] (-1 -> index 0)."""
  groups = values.shape[0]
  index = jnp.maximum(caption, 0).reshape(groups, -1)
  return jnp.take_along_axis(values, index, axis=1).reshape(caption.shape)


class BoxSequences(NamedTuple):
  """The box task sequences of a batch, one a caption place (keys box/*).

  tokens int [G, C, T] in the decoder's vocabulary; target bool [G, C, T]:
  the positions whose token is a target; valid bool [G, C]: the places that
  hold a task.
  """
  tokens: Any
  target: Any
  valid: Any


def box_sequences(batch) -> BoxSequences | None:
  """The batch's box task sequences; None in a batch without them."""
  if 'box/tokens' not in batch:
    return None
  return BoxSequences(batch['box/tokens'], batch['box/target'], batch['box/valid'])


class DecoderRows(NamedTuple):
  """What the decoder reads per token, [G, N, T] each, of any kind of row.

  tokens, position, segment: as in CaptionLayout; query: its slot among the
  cross-attention's query rows (`cross_layout`), place * T + position, with
  place its caption place c, or C + c for place c's box task, and -1 for a
  token of no valid caption or task; mine: it belongs to a valid caption or
  task (else nothing it computes counts); targets: its token is a target;
  parallel: a CapPa token ([MASK] input, attends to its whole caption).
  """
  tokens: Any
  position: Any
  segment: Any
  query: Any
  mine: Any
  targets: Any
  parallel: Any


def caption_rows(layout: CaptionLayout, valid, parallel, pad_id: int) -> DecoderRows:
  """The caption rows: each caption's non-pad tokens are its targets."""
  tokens, position, segment, caption = layout
  mine = (caption >= 0) & per_caption(valid, caption)
  if parallel is None:
    parallel = jnp.zeros(valid.shape, bool)
  query = jnp.where(mine, caption * tokens.shape[-1] + position, -1)
  return DecoderRows(tokens, position, segment, query, mine,
                     mine & (tokens != pad_id), per_caption(parallel, caption) & mine)


def box_rows(boxes: BoxSequences) -> DecoderRows:
  """One row a caption place: its box task, one causal sequence over the
  whole row (its padding follows its last target, so no target sees it),
  cross-attending to the place's image (query row C + c)."""
  tokens = boxes.tokens
  places, length = tokens.shape[1:]
  mine = jnp.broadcast_to(boxes.valid[..., None], tokens.shape)
  query = (places + jnp.arange(places))[:, None] * length + jnp.arange(length)
  return DecoderRows(
      tokens, jnp.broadcast_to(jnp.arange(length), tokens.shape),
      jnp.ones_like(tokens), jnp.where(mine, query, -1),
      mine, boxes.target & mine, jnp.zeros(tokens.shape, bool))


class CrossLayout(NamedTuple):
  """Where the cross-attention's queries and keys come from (`cross_layout`):
  Q query rows a group of T slots each, one a caption place (then one a box
  task), each reading the one image row that holds its image.

  gather: int [G, Q*T], the text token (flat in the group's N*T) in each
  query slot, N*T for an empty slot; scatter: int [G, N*T], each text token's
  query slot, Q*T for a token of no valid caption or task; image_row: int
  [G, Q], each query row's image row within the group; ids: `Segments` of the
  query rows [G*Q, T] and of their image rows [G*Q, L].
  """
  gather: Any
  scatter: Any
  image_row: Any
  ids: Any


def cross_layout(rows: DecoderRows, slot, image_segment, slots: int,
                 with_boxes: bool) -> CrossLayout:
  """The query rows of `rows` [G, N, T]: the C caption places of `slot`
  [G, C] (`text/slot`), then, `with_boxes`, their C box tasks; against the
  images of `image_segment` [B, L], E = `slots` a row.

  Inside an image row the ids are its segments (slot k's tokens k + 1,
  padding 0) and a query's is its place's slot k + 1: it sees exactly its
  own image. An empty query slot takes the id of its image row's first token
  (padding in an empty row), so that no query row is empty (attention.py);
  nothing reads its output.
  """
  groups, n, length = rows.tokens.shape
  batch, tokens_per_row = image_segment.shape
  per_group = batch // groups
  copies = 2 if with_boxes else 1  # Query rows a caption place.
  query_slots = copies * slot.shape[1] * length
  query = rows.query.reshape(groups, n * length)
  scatter = jnp.where(query >= 0, query, query_slots)
  gather = jax.vmap(lambda to: jnp.full(query_slots, n * length, jnp.int32).at[to].set(
      jnp.arange(n * length, dtype=jnp.int32), mode='drop'))(scatter)
  # An unused place's slot may be anything: its row is clipped into the group.
  image_row = jnp.tile(jnp.clip(slot // slots, 0, per_group - 1), (1, copies))
  kv_ids = jax.vmap(lambda segment, row: segment[row])(
      image_segment.reshape(groups, per_group, tokens_per_row), image_row)
  own = jnp.tile(slot % slots + 1, (1, copies))
  filled = (gather < n * length).reshape(groups, -1, length)
  q_ids = jnp.where(filled, own[..., None], kv_ids[..., :1])
  return CrossLayout(gather, scatter, image_row, attention_lib.Segments(
      q_ids.reshape(-1, length), kv_ids.reshape(-1, tokens_per_row)))


SPLASH_TILE = 128  # Splash's kv tiles, and its backward's q tiles, are multiples.


def gathered_attention(q, k, v, layout: CrossLayout, *, kernel):
  """Cross-attention through `kernel` (a name in attention.py or a callable)
  on the query rows of `layout`: q [G*N, T, H, Dh] of the text rows; k, v
  [B, L, H, Dh] of the image rows. Returns [G*N, T, H, Dh]: a token of no
  valid caption or task gets zeros.

  Every gather stays inside its group (batched over G), so with groups split
  over devices nothing crosses devices. 'splash' runs where T and L are
  multiples of 128 (its tiles, forward and backward), else 'dense'.
  """
  groups, query_rows = layout.image_row.shape
  rows, length, heads, head_dim = q.shape
  if kernel == 'splash' and (length % SPLASH_TILE or k.shape[1] % SPLASH_TILE):
    kernel = 'dense'
  per_group = lambda a: a.reshape(groups, -1, *a.shape[-2:])
  take = jax.vmap(lambda a, i: a.at[i].get(mode='fill', fill_value=0))
  q = take(per_group(q), layout.gather).reshape(groups * query_rows, length,
                                                heads, head_dim)
  image = lambda a: take(a.reshape(groups, a.shape[0] // groups, *a.shape[1:]),
                         layout.image_row).reshape(-1, *a.shape[1:])
  out = attention_lib.get(kernel)(q, image(k), image(v), layout.ids)
  return take(per_group(out), layout.scatter).reshape(rows, length, heads, head_dim)


class DecoderBlock(nn.Module):
  """x + self-attention, x + cross-attention to the image, x + MLP; pre-LN."""
  mlp_dim: int
  num_heads: int
  attention: Any = 'dense'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, self_mask, image, cross: CrossLayout):
    """x [G*N, T, D]; image [B, L, D]; cross: its query rows (`cross_layout`)."""
    x = partitioning.constrain_batch(x)
    self_kernel = 'dense' if self.attention == 'splash' else self.attention
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + encoder.MultiHeadAttention(
        self.num_heads, attention=self_kernel, dtype=self.dtype,
        name='SelfAttention')(y, y, self_mask)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_1')(x)
    x = x + encoder.MultiHeadAttention(
        self.num_heads, dtype=self.dtype, name='CrossAttention',
        attention=functools.partial(gathered_attention, kernel=self.attention))(
            y, image, cross)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = encoder.MlpBlock(self.mlp_dim, dtype=self.dtype, name='MlpBlock')(y)
    return partitioning.constrain_batch(x + y)


class CaptionDecoder(nn.Module):
  """Per-token cross-entropy of the captions (and box tasks) of a packed batch.

  Attributes:
    vocab_size: the decoder's vocabulary (`vocab_size(config)`).
    max_len: the text tower's caption length.
    width, depth, mlp_dim, num_heads: the decoder's size.
    pad_id: the padding token (never a caption target).
    attention: the cross-attention's kernel (see the module docstring).
    dtype: compute dtype; the log-softmax is float32.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pad_id: int = 0
  attention: Any = 'dense'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_tokens, image_segment, slots: int,
               layout: CaptionLayout, slot, valid, parallel=None,
               boxes: BoxSequences | None = None, return_logits: bool = False):
    """Returns (cross-entropy float32 [G, N, T], targets bool [G, N, T]); with
    `boxes`, of the N caption rows then the C box rows: [G, N + C, T] each.
    With `return_logits`, the float32 logits [G, N (+ C), T, vocab_size]
    instead (greedy decoding, evaluate/referring.py).

    image_tokens [B, L, W] and image_segment [B, L]: the image tower's
    output and the batch's segments; slots: E; slot, valid [G, C]: `text/slot`,
    `text/valid`; parallel bool [G, C] or None: the CapPa captions.
    """
    rows = caption_rows(layout, valid, parallel, self.pad_id)
    if boxes is not None:
      rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1),
                          rows, box_rows(boxes))
    tokens, position, segment = rows.tokens, rows.position, rows.segment
    groups, n, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'text length {length} exceeds max_len {self.max_len}')

    # Inputs: BOS at position 0, else the previous token of the row (of the
    # caption, when the position is not 0); [MASK] everywhere for CapPa.
    embed = nn.Embed(self.vocab_size, self.width, name='Embed')
    previous = jnp.pad(tokens, ((0, 0), (0, 0), (1, 0)))[..., :-1]
    x = embed(previous)
    bos = self.param('bos', nn.initializers.normal(0.02), (self.width,))
    mask_token = self.param('mask', nn.initializers.normal(0.02), (self.width,))
    x = jnp.where((position == 0)[..., None], bos, x)
    x = jnp.where(rows.parallel[..., None], mask_token, x)
    pos = self.param('pos_embedding', nn.initializers.normal(self.width ** -0.5),
                     (self.max_len, self.width))
    x = (x + pos[position]).reshape(groups * n, length, self.width)

    flat = lambda a: a.reshape(groups * n, length)
    causal = jnp.tril(jnp.ones((length, length), bool))
    self_mask = attention_lib.segment_mask(flat(segment), flat(segment)) & (
        causal | flat(rows.parallel)[:, None, :, None])

    image = nn.Dense(self.width, dtype=self.dtype, name='image_projection',
                     **precision.dense_options())(image_tokens)
    cross = cross_layout(rows, slot, image_segment, slots, boxes is not None)

    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = DecoderBlock(self.mlp_dim, self.num_heads, self.attention, self.dtype,
                       name=f'block_{i}')(x, self_mask, image, cross)
    x = nn.LayerNorm(dtype=self.dtype, name='decoder_norm')(x)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, name='head',
                      **precision.dense_options())(x).astype(jnp.float32)
    logits = logits.reshape(groups, n, length, self.vocab_size)
    if return_logits:
      return logits
    log_p = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(rows.targets, ce, 0.0), rows.targets
