"""Contrastive image-text losses: sigmoid (SigLIP) and softmax (CLIP).

Every loss takes L2-normalised embeddings `zimg`, `ztxt` [N, D] (row i of each
is a pair), a `valid` mask [N] (False marks an empty slot, which is neither a
positive nor a negative and is not counted), the log temperature `t_log`
(t = exp(t_log)) and, for the sigmoid loss, a bias `b` (None: no bias).
Each returns `(loss, metrics)`; the metrics are computed over valid slots:

  t, b          the temperature and the bias (no `b` without one)
  pos_logit     mean logit of the valid pairs
  neg_logit     mean logit of the valid non-pairs
  i2t_top1      fraction of images whose own caption has the largest logit
  t2i_top1      fraction of captions whose own image has the largest logit

The dense versions are single-device references written for clarity. The
sharded versions take global arrays sharded on their leading axis over the
mesh's `batch_axes` (N a multiple of their device count) and run per device
under `jax.shard_map`:

  sigmoid_loss_ring       SigLIP's chunked ring: captions travel round the
                          devices, logits are b x b (b = N / devices). Its
                          backward pass is a second ring (custom VJP) that
                          carries each caption chunk's gradient home, so
                          per-device memory stays O(b^2 + b d) both ways.
  sigmoid_loss_allgather  gathers all captions: logits b x N.
  softmax_loss_sharded    open_clip's local loss: local rows against gathered
                          columns in both directions, logits b x N.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lit_navit.sharding import BATCH_AXES


def _sigmoid_block(zimg, ztxt, row_valid, col_valid, t_log, b, pos_mask):
  """Summed sigmoid loss of one block of logits, and the logits."""
  logits = jnp.exp(t_log) * zimg @ ztxt.T + b
  labels = jnp.where(pos_mask, 1.0, -1.0)
  pair_valid = row_valid[:, None] & col_valid[None, :]
  loss = -jnp.where(pair_valid, jax.nn.log_sigmoid(labels * logits), 0.0).sum()
  return loss, logits


def _softmax_rows(logits, pos_mask, row_valid, col_valid):
  """Summed cross-entropy of the valid rows; invalid columns are masked out."""
  masked = jnp.where(col_valid[None, :], logits, jnp.finfo(logits.dtype).min)
  positive = jnp.where(pos_mask, logits, 0.0).sum(axis=1)
  per_row = jax.nn.logsumexp(masked, axis=1) - positive
  return jnp.where(row_valid, per_row, 0.0).sum()


def _negatives(logits, pos_mask, row_valid, col_valid):
  """Sum of the negative logits of a block, and their max per row and column."""
  logits = jax.lax.stop_gradient(logits)  # Metrics only.
  negative = row_valid[:, None] & col_valid[None, :] & jnp.logical_not(pos_mask)
  masked = jnp.where(negative, logits, -jnp.inf)
  return jnp.where(negative, logits, 0.0).sum(), masked.max(1), masked.max(0)


def _stats(valid, pos, neg_sum, i2t_neg_max, t2i_neg_max):
  """Sums that the metrics are made of, over the slots of one device.

  `pos` is each slot's pair logit, `i2t_neg_max` the largest negative logit in
  its image's row, `t2i_neg_max` the largest in its caption's column.
  """
  pos = jax.lax.stop_gradient(pos)
  count = lambda x: jnp.sum(valid & x, dtype=jnp.float32)
  return {
      'n_valid': count(True),
      'pos_sum': jnp.where(valid, pos, 0.0).sum(),
      'neg_sum': neg_sum,
      'i2t_correct': count(pos > i2t_neg_max),
      't2i_correct': count(pos > t2i_neg_max),
  }


def _per_valid_slot(loss_sum, stats):
  return loss_sum / jnp.maximum(stats['n_valid'], 1.0)


def _metrics(stats, t_log, b):
  n = stats['n_valid']
  metrics = {
      't': jnp.exp(t_log),
      'pos_logit': _per_valid_slot(stats['pos_sum'], stats),
      'neg_logit': stats['neg_sum'] / jnp.maximum(n * (n - 1), 1.0),
      'i2t_top1': _per_valid_slot(stats['i2t_correct'], stats),
      't2i_top1': _per_valid_slot(stats['t2i_correct'], stats),
  }
  if b is not None:
    metrics['b'] = b
  return jax.lax.stop_gradient(metrics)


def _bias_or_zero(b):
  return jnp.zeros((), jnp.float32) if b is None else b


def _float32(zimg, ztxt):
  """Losses run in float32, whatever the towers' compute dtype."""
  return zimg.astype(jnp.float32), ztxt.astype(jnp.float32)


def sigmoid_loss_dense(zimg, ztxt, valid, t_log, b=None):
  """SigLIP loss on one device: -1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)).

  z_ij is +1 on the pairs (i = j) and -1 elsewhere; |B| counts valid slots.
  """
  zimg, ztxt = _float32(zimg, ztxt)
  eye = jnp.eye(len(valid), dtype=bool)
  loss_sum, logits = _sigmoid_block(
      zimg, ztxt, valid, valid, t_log, _bias_or_zero(b), eye)
  neg_sum, i2t_max, t2i_max = _negatives(logits, eye, valid, valid)
  stats = _stats(valid, jnp.diagonal(logits), neg_sum, i2t_max, t2i_max)
  return _per_valid_slot(loss_sum, stats), _metrics(stats, t_log, b)


def softmax_loss_dense(zimg, ztxt, valid, t_log):
  """CLIP loss on one device: mean of image->text and text->image CE."""
  zimg, ztxt = _float32(zimg, ztxt)
  logits = jnp.exp(t_log) * zimg @ ztxt.T
  eye = jnp.eye(len(valid), dtype=bool)
  loss_sum = (_softmax_rows(logits, eye, valid, valid)
              + _softmax_rows(logits.T, eye, valid, valid)) / 2
  neg_sum, i2t_max, t2i_max = _negatives(logits, eye, valid, valid)
  stats = _stats(valid, jnp.diagonal(logits), neg_sum, i2t_max, t2i_max)
  return _per_valid_slot(loss_sum, stats), _metrics(stats, t_log, None)


def _num_devices(mesh, batch_axes):
  return math.prod(mesh.shape[a] for a in batch_axes)


def _offset_eye(rows, cols, batch_axes):
  """Marks, in a device's b x N block, each row's own column."""
  first = jax.lax.axis_index(batch_axes) * rows
  return jnp.arange(cols)[None, :] == first + jnp.arange(rows)[:, None]


def _run_sharded(local_fn, mesh, batch_axes, args):
  """Runs `local_fn` per device: batch arrays sharded, scalars replicated.

  `local_fn` returns the loss's summed value and stats on its device; the
  global loss divides their psum by the global count of valid slots.
  """
  def global_sums(zimg, ztxt, valid, t_log, b):
    loss_sum, stats = jax.lax.psum(
        local_fn(zimg, ztxt, valid, t_log, b), batch_axes)
    return _per_valid_slot(loss_sum, stats), stats

  zimg, ztxt, *rest = args
  rows = P(batch_axes)
  return jax.shard_map(
      global_sums, mesh=mesh, in_specs=(rows, rows, rows, P(), P()),
      out_specs=P())(*_float32(zimg, ztxt), *rest)


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_sigmoid(zimg, ztxt, valid, t_log, b, batch_axes, n):
  """Per-device loss sum and stats of the ring; see `sigmoid_loss_ring`."""
  return _ring_sigmoid_fwd(zimg, ztxt, valid, t_log, b, batch_axes, n)[0]


def _ring_positives(valid, step):
  """The device's own chunk (step 0) holds the pairs; others only negatives."""
  return jnp.eye(len(valid), dtype=bool) & (step == 0)


def _ring_sigmoid_fwd(zimg, ztxt, valid, t_log, b, batch_axes, n):
  def step(k, carry):
    loss, neg_sum, pos, i2t_max, ztxt_k, valid_k, t2i_max_k = carry
    pos_mask = _ring_positives(valid, k)
    loss_k, logits = _sigmoid_block(
        zimg, ztxt_k, valid, valid_k, t_log, b, pos_mask)
    neg_sum_k, i2t_max_k, t2i_max_new = _negatives(
        logits, pos_mask, valid, valid_k)
    pos = pos + jnp.where(pos_mask, logits, 0.0).sum(1)
    # A caption chunk travels with the running max of its columns; the n-th
    # hop brings both home.
    ztxt_k, valid_k, t2i_max_k = jax.lax.ppermute(
        (ztxt_k, valid_k, jnp.maximum(t2i_max_k, t2i_max_new)), batch_axes,
        _ring_perm(n))
    return (loss + loss_k, neg_sum + neg_sum_k, pos,
            jnp.maximum(i2t_max, i2t_max_k), ztxt_k, valid_k, t2i_max_k)

  # *_like keeps the carry varying over the devices, as the loop's outputs are.
  no_max = jnp.full_like(valid, -jnp.inf, zimg.dtype)
  zero = jnp.zeros_like(t_log)
  loss, neg_sum, pos, i2t_max, _, _, t2i_max = jax.lax.fori_loop(
      0, n, step, (zero, zero, jnp.zeros_like(no_max), no_max, ztxt, valid,
                   no_max))
  stats = _stats(valid, pos, neg_sum, i2t_max, t2i_max)
  return (loss, stats), (zimg, ztxt, valid, t_log, b)


def _ring_sigmoid_bwd(batch_axes, n, residuals, cotangents):
  zimg, ztxt, valid, t_log, b = residuals
  g_loss, _ = cotangents  # The stats are metrics: no gradient flows from them.

  def step(k, carry):
    g_zimg, g_t, g_b, ztxt_k, valid_k, g_ztxt_k = carry
    loss_fn = lambda zi, zt, tl, bb: _sigmoid_block(
        zi, zt, valid, valid_k, tl, bb, _ring_positives(valid, k))[0]
    gi, gt_k, gt, gb = jax.vjp(loss_fn, zimg, ztxt_k, t_log, b)[1](g_loss)
    # A caption chunk travels with the gradient accumulated for it so far; the
    # n-th hop brings both home.
    ztxt_k, valid_k, g_ztxt_k = jax.lax.ppermute(
        (ztxt_k, valid_k, g_ztxt_k + gt_k), batch_axes, _ring_perm(n))
    return g_zimg + gi, g_t + gt, g_b + gb, ztxt_k, valid_k, g_ztxt_k

  zeros = jax.tree.map(jnp.zeros_like, (zimg, t_log, b))
  g_zimg, g_t, g_b, _, _, g_ztxt = jax.lax.fori_loop(
      0, n, step, (*zeros, ztxt, valid, jnp.zeros_like(ztxt)))
  return g_zimg, g_ztxt, None, g_t, g_b


_ring_sigmoid.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_loss_ring(zimg, ztxt, valid, t_log, b=None, *, mesh,
                      batch_axes=BATCH_AXES):
  """SigLIP loss by the chunked ring; equals `sigmoid_loss_dense`.

  On n devices, each computes its local b x b block (which holds its pairs),
  then passes its captions and their valid mask to the next device; n - 1
  hops bring every other chunk past it, adding negatives only, and an n-th
  hop brings each chunk home with what was accumulated for it (its column
  maxima; in the backward pass its gradient). Per-device memory is
  O(b^2 + b d) for d-dimensional embeddings, whatever N.
  """
  n = _num_devices(mesh, batch_axes)

  def local(zimg, ztxt, valid, t_log, b):
    # Varying copies: their cotangents, summed over devices, are the gradients.
    t_log, b = jax.lax.pcast((t_log, b), batch_axes, to='varying')
    return _ring_sigmoid(zimg, ztxt, valid, t_log, b, batch_axes, n)

  bias = _bias_or_zero(b)
  loss, stats = _run_sharded(
      local, mesh, batch_axes, (zimg, ztxt, valid, t_log, bias))
  return loss, _metrics(stats, t_log, b)


def sigmoid_loss_allgather(zimg, ztxt, valid, t_log, b=None, *, mesh,
                           batch_axes=BATCH_AXES):
  """SigLIP loss with all captions gathered: b x N logits per device."""

  def local(zimg, ztxt, valid, t_log, b):
    ztxt_all, valid_all = jax.lax.all_gather(
        (ztxt, valid), batch_axes, tiled=True)
    pos_mask = _offset_eye(len(valid), len(valid_all), batch_axes)
    loss, logits = _sigmoid_block(
        zimg, ztxt_all, valid, valid_all, t_log, b, pos_mask)
    neg_sum, i2t_max, col_max = _negatives(logits, pos_mask, valid, valid_all)
    # A caption's column spans every device's rows.
    col_max = jax.lax.pmax(col_max, batch_axes).reshape(-1, len(valid))
    t2i_max = col_max[jax.lax.axis_index(batch_axes)]
    pos = jnp.where(pos_mask, logits, 0.0).sum(1)
    return loss, _stats(valid, pos, neg_sum, i2t_max, t2i_max)

  bias = _bias_or_zero(b)
  loss, stats = _run_sharded(
      local, mesh, batch_axes, (zimg, ztxt, valid, t_log, bias))
  return loss, _metrics(stats, t_log, b)


def softmax_loss_sharded(zimg, ztxt, valid, t_log, *, mesh,
                         batch_axes=BATCH_AXES):
  """CLIP loss with open_clip's local-loss scheme; equals `softmax_loss_dense`.

  Each device scores its images against all captions and its captions against
  all images (b x N logits each way).
  """

  def local(zimg, ztxt, valid, t_log, _):
    zimg_all, ztxt_all, valid_all = jax.lax.all_gather(
        (zimg, ztxt, valid), batch_axes, tiled=True)
    pos_mask = _offset_eye(len(valid), len(valid_all), batch_axes)
    t = jnp.exp(t_log)
    i2t = t * zimg @ ztxt_all.T
    t2i = t * ztxt @ zimg_all.T
    loss = (_softmax_rows(i2t, pos_mask, valid, valid_all)
            + _softmax_rows(t2i, pos_mask, valid, valid_all)) / 2
    neg_sum, i2t_max, _ = _negatives(i2t, pos_mask, valid, valid_all)
    _, t2i_max, _ = _negatives(t2i, pos_mask, valid, valid_all)
    pos = jnp.where(pos_mask, i2t, 0.0).sum(1)
    return loss, _stats(valid, pos, neg_sum, i2t_max, t2i_max)

  loss, stats = _run_sharded(
      local, mesh, batch_axes, (zimg, ztxt, valid, t_log, jnp.zeros(())))
  return loss, _metrics(stats, t_log, None)


def make_loss(name: str, mesh, batch_axes=BATCH_AXES):
  """The trainer's loss: fn(zimg, ztxt, valid, t_log, b) -> (loss, metrics).

  name: 'sigmoid' (ring), 'sigmoid_allgather' or 'softmax'. The softmax loss
  ignores `b`: a shift of every logit leaves a softmax unchanged.
  """
  sharded = dict(mesh=mesh, batch_axes=batch_axes)
  if name == 'sigmoid':
    return functools.partial(sigmoid_loss_ring, **sharded)
  if name == 'sigmoid_allgather':
    return functools.partial(sigmoid_loss_allgather, **sharded)
  if name == 'softmax':
    return lambda zimg, ztxt, valid, t_log, b=None: softmax_loss_sharded(
        zimg, ztxt, valid, t_log, **sharded)
  raise ValueError(f'Unknown loss {name!r}: expected one of '
                   "'sigmoid', 'sigmoid_allgather', 'softmax'.")
