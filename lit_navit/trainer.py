"""The one trainer: state set-up, the step function and the loop with its hooks.

The step stays short; checkpointing, logging, evaluation and preemption are
hooks the loop runs every N steps. Decisions that must agree across hosts
(stop now) are made once and shared.
"""

import dataclasses
import functools
import logging
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lit_navit.interop import big_vision
from lit_navit import checkpoint
from lit_navit import distill
from lit_navit import losses
from lit_navit import metrics as metrics_lib
from lit_navit import optim
from lit_navit import rules
from lit_navit import sharding
from lit_navit import teacher as teacher_lib
from lit_navit import xla_options
from lit_navit.data import batch as batch_lib
from lit_navit.data import boxes
from lit_navit.data import pipeline as pipeline_lib
from lit_navit.data import prefetch
from lit_navit.data import readers
from lit_navit.data import retry
from lit_navit.data import sources
from lit_navit.data import text
from jax.sharding import NamedSharding, PartitionSpec as P
from lit_navit.evaluate import referring
from lit_navit.models import decoder as decoder_lib
from lit_navit.models import flops as flops_lib
from lit_navit.models import precision
from lit_navit.models import two_towers

log = logging.getLogger('lit_navit')


# What the device needs of a batch; `index` (int64 example ids) stays on the host.
MODEL_KEYS = ('image/patches', 'image/yx', 'image/grid', 'image/segment',
              'valid', 'text/tokens', 'text/slot', 'text/valid',
              # Text packing only (batch.py).
              'text/segment', 'text/position', 'text/row', 'text/row_segment',
              # Local crops and token masks only, for model.distill (batch.py).
              'image/parent', 'image/masked',
              # LocCa's box tasks only, for model.decoder.box_weight (batch.py).
              'box/tokens', 'box/target', 'box/valid')


def model_inputs(batch: dict) -> dict:
  """The arrays of a host batch that go to the device."""
  return {k: batch[k] for k in MODEL_KEYS if k in batch}


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


@dataclasses.dataclass
class RunResult:
  steps: int
  seconds: float
  preempted: bool
  final_metrics: dict


def make_pipeline(config, source, *, rows: int, groups: int = 1, mode: str = 'train',
                  process_index: int | None = None, process_count: int | None = None):
  """The input pipeline of this process (or of the host given) for `config`.

  `groups` is the caption groups of its rows: its device shards (see
  `caption_groups`). With input.box_tasks on, the pipeline writes the box
  tasks in the decoder's token format.
  """
  tokenizer = text.Tokenizer.from_config(config.input)
  input_config = config.input.copy_and_resolve_references()
  with input_config.unlocked():
    input_config.mode = mode
  box_format = (boxes.format_from_config(config)
                if config.input.get('box_tasks', False) else None)
  return pipeline_lib.Pipeline(
      source, tokenizer, input_config, rows=rows, seed=config.seed, groups=groups,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count,
      box_format=box_format)


def caption_groups(mesh) -> int:
  """The batch's caption groups: one per device shard of the batch axes.

  A group's captions then live on the device that holds its rows, so the
  gather of image embeddings to captions needs no communication.
  """
  return math.prod(mesh.shape.get(axis, 1) for axis in sharding.BATCH_AXES)


def check_divisibility(config, mesh) -> None:
  """Rejects a global batch that the devices or hosts cannot split evenly."""
  if config.batch_size % mesh.size:
    raise ValueError(f'config key batch_size={config.batch_size} does not divide '
                     f'over the {mesh.size} devices of the mesh')
  hosts = sharding.process_count(mesh)
  if config.batch_size % hosts:
    raise ValueError(f'config key batch_size={config.batch_size} does not divide '
                     f'over the {hosts} processes of the mesh')


def check_kernels(config, mesh) -> None:
  """Rejects an attention kernel the mesh's devices cannot run."""
  platform = sharding.platform(mesh)
  for tower in ('image', 'text', 'decoder'):
    if config.model[tower].attention == 'splash' and platform != 'tpu':
      raise ValueError(f"config key model.{tower}.attention='splash' is a TPU "
                       f'kernel; the mesh\'s devices are {platform}')


def check_evals(config) -> None:
  """Rejects an evaluation the config cannot run."""
  if config.evals.caption_perplexity and not (
      two_towers.has_decoder(config.model) and config.evals.heldout.kind):
    raise ValueError('config key evals.caption_perplexity=True needs a captioning '
                     'decoder (model.decoder.weight > 0) and held-out batches '
                     '(evals.heldout.kind)')
  if config.evals.box_accuracy and not (
      decoder_lib.box_tasks_on(config.model) and config.input.get('box_tasks', False)
      and config.evals.heldout.kind):
    raise ValueError('config key evals.box_accuracy=True needs the decoder\'s box '
                     'tasks (model.decoder.weight > 0, model.decoder.box_weight > 0, '
                     'input.box_tasks=True) and held-out batches (evals.heldout.kind)')


class Trainer:
  """Trains a two-tower model from a checked config into `workdir`.

  Construction builds the mesh over `devices` (default: every device of
  every host), the shardings, the abstract state and the step; nothing is
  allocated and no file is read, so `plan.py` builds the very same step for
  a TPU topology's devices on a machine without one. The input pipeline and
  the checkpointer are set up on first use.
  """

  def __init__(self, config, workdir: str | None, *, devices=None,
               start_over: bool = False):
    self.config = config
    self.workdir = workdir
    self.start_over = start_over  # when no checkpoint is readable
    self.mesh = sharding.make_mesh(config, devices)
    check_divisibility(config, self.mesh)
    check_kernels(config, self.mesh)
    check_evals(config)
    self.process_count = sharding.process_count(self.mesh)
    self.local_rows = config.batch_size // self.process_count
    self.local_groups = caption_groups(self.mesh) // self.process_count
    self.model = two_towers.TwoTowers(config.model)
    self.loss_fn = losses.make_loss(config.model.loss, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, P())
    self._compiled = {}  # (patch size, distilling) -> compiled train step
    self._stop_requested = False
    self._init_state()

  @functools.cached_property
  def pipeline(self):
    """This host's training input, streamed (nothing indexes the files)."""
    source = readers.make_reader(
        self.config.input.source,
        retry.RetryPolicy(self.config.input.read_retries, self.config.input.retry_delay))
    return prefetch.Prefetch(
        make_pipeline(self.config, source, rows=self.local_rows,
                      groups=self.local_groups))

  @functools.cached_property
  def checkpointer(self):
    c = self.config.checkpoint
    return checkpoint.Checkpointer(self.workdir, keep=c.keep, keep_every=c.keep_every,
                                   async_save=c.async_save)

  # --- state ---------------------------------------------------------------

  def abstract_batch(self, patch_size: int) -> dict:
    """The global batch the step takes at `patch_size`: shapes, dtypes, shardings."""
    spec = pipeline_lib.batch_spec(self.config.input, rows=self.config.batch_size,
                                   groups=caption_groups(self.mesh),
                                   patch_size=patch_size)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_sharding)
            for k, (s, d) in spec.shapes().items() if k in MODEL_KEYS}

  def _init_state(self) -> None:
    example = self.abstract_batch(self.config.input.patch_sizes[0])
    init_params = lambda: self.model.init(
        jax.random.key(self.config.seed), _zeros(example))['params']
    abstract_params = jax.eval_shape(init_params)
    self.tx, self.schedules = optim.make_optimizer(
        self.config.optim, abstract_params, self.config.total_steps)
    self.frozen_towers = frozen_towers(self.config.optim.schedule, abstract_params)

    def init_state():
      params = init_params()
      state = {'step': jnp.zeros((), jnp.int32), 'params': params,
               'opt_state': self.tx.init(params)}
      if self.distilling_ever:
        state['teacher'] = teacher_lib.init(params, self.config.model)
      return state

    abstract_state = jax.eval_shape(init_state)
    param_sh = sharding.param_shardings(
        abstract_params, self.config.sharding_rules, self.mesh)
    self.state_sharding = {
        'step': self.replicated,
        'params': param_sh,
        'opt_state': sharding.state_shardings(
            abstract_state['opt_state'], abstract_params, param_sh, self.mesh),
    }
    if self.distilling_ever:
      self.state_sharding['teacher'] = teacher_lib.shardings(param_sh, self.replicated)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, self.state_sharding)
    self._init_fn = jax.jit(init_state, out_shardings=self.state_sharding)

  def restore_or_init(self):
    """The newest good checkpoint's state (and the pipeline's), else a fresh one."""
    restored = self.checkpointer.restore_latest(self.abstract_state, self.config,
                                                start_over=self.start_over)
    if restored is None:
      log.info('no checkpoint in %s: starting from scratch', self.workdir)
      state = self._init_fn()
      if self.config.init_from:
        state['params'] = self._load_init_params(state['params'])
        if 'teacher' in state:  # the teacher starts as the loaded student
          state['teacher'] = jax.jit(
              lambda params: teacher_lib.init(params, self.config.model),
              out_shardings=self.state_sharding['teacher'])(state['params'])
      return state
    step, state, data_state = restored
    self.pipeline.set_state(self._own_data_state(data_state))
    log.info('resumed from step %d', step)
    return state

  def _load_init_params(self, params):
    """Replaces the params matching config.init_params with init_from's
    (a workdir, a step directory or a big_vision .npz)."""
    init_from = self.config.init_from
    if init_from.endswith('.npz'):
      loaded_by_path = big_vision.to_ours(big_vision.load_npz(init_from),
                                          self.config.model)
    else:
      _, loaded = checkpoint.load_for_inference(init_from)
      loaded_by_path = dict(zip(rules.tree_paths(loaded), jax.tree.leaves(loaded)))
    take = rules.match_rules(params, [(self.config.init_params, True), ('.*', False)],
                             'config.init_params')

    def pick(key_path, param, take_it, sharding_):
      if not take_it:
        return param
      path = rules.path_str(key_path)
      if path not in loaded_by_path:
        raise ValueError(f'config.init_from={init_from!r} has no param {path!r} '
                         f'(model expects {tuple(param.shape)})')
      if loaded_by_path[path].shape != param.shape:
        raise ValueError(f'config.init_from={init_from!r} param {path!r} has shape '
                         f'{tuple(loaded_by_path[path].shape)}, model expects '
                         f'{tuple(param.shape)}')
      return jax.device_put(np.asarray(loaded_by_path[path]), sharding_)

    log.info('initialising %r params from %s', self.config.init_params, init_from)
    return jax.tree_util.tree_map_with_path(pick, params, take,
                                            self.state_sharding['params'])

  # --- the step ------------------------------------------------------------

  @property
  def distilling_ever(self) -> bool:
    """Whether model.distill is on: the state then holds a teacher."""
    return two_towers.distill_on(self.config.model)

  def distilling_at(self, step: int) -> bool:
    """Whether the step from `step` to step + 1 runs the teacher objectives."""
    return self.distilling_ever and step >= self.config.model.distill.start_step

  def _loss(self, params, batch, step=None, targets=None):
    """(loss, metrics) of the model on one batch.

    The captioning decoder's loss, with a decoder, is added at its weight,
    and its box tasks' loss (batches with box/*) at model.decoder.box_weight;
    `step` keys its CapPa draw (None: no parallel captions, as in evaluation).
    metrics['caption_targets'] ('box_targets') is the token count its mean is
    over. With the
    teacher's `targets`, the distillation losses are added (distill.py).
    """
    key = None if step is None else jax.random.fold_in(
        jax.random.key(self.config.seed), step)
    zimg, ztxt, extras = self.model.apply({'params': params}, batch, train=True,
                                          caption_key=key)
    # t and b are stored as shape (1,), as in big_vision checkpoints.
    b = params['b'].reshape(()) if 'b' in params else None
    loss, metrics = self.loss_fn(zimg, ztxt, batch['text/valid'].reshape(-1),
                                 params['t'].reshape(()), b)
    if 'caption_loss' in extras:
      loss = loss + self.config.model.decoder.weight * extras['caption_loss']
      metrics = dict(metrics, caption_loss=extras['caption_loss'],
                     caption_targets=extras['caption_targets'])
    if 'box_loss' in extras:
      loss = loss + self.config.model.decoder.box_weight * extras['box_loss']
      metrics = dict(metrics, box_loss=extras['box_loss'],
                     box_targets=extras['box_targets'])
    if targets is not None:
      extra, distill_metrics = distill.losses(self.config.model, params, batch,
                                              extras['slots'], targets)
      loss, metrics = loss + extra, {**metrics, **distill_metrics}
    return loss, metrics

  def _train_step(self, state, batch, distilling: bool = False):
    # The images with captions: local crops (image/parent > 0) are views, not images.
    valid = batch['valid'] & (batch['image/parent'] == 0) if 'image/parent' in batch \
        else batch['valid']
    # The model pins its activations to this mesh's batch axes (partitioning.py).
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
        precision.f32_grads(self.config.model.f32_grads):
      targets = (teacher_lib.targets(self.config.model, state['teacher'], batch)
                 if distilling else None)
      (loss, step_metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(
          state['params'], batch, state['step'], targets)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    real_tokens = jnp.sum(batch['image/segment'] != batch_lib.PAD_SEGMENT)
    step_metrics = dict(
        step_metrics, loss=loss, grad_norm=optax.tree.norm(grads),
        images=jnp.sum(valid), tokens=real_tokens,
        padding_fraction=1.0 - real_tokens / batch['image/segment'].size,
        images_per_row=jnp.sum(valid) / valid.shape[0],
        empty_caption_fraction=1.0 - jnp.mean(batch['text/valid']),
        # The text tower's share of pad tokens: what shorter captions
        # (a smaller text_len) or text packing would save.
        text_padding_fraction=jnp.mean(
            batch['text/tokens'] == self.config.model.text.pad_id),
        # The text rows a pair's caption fills: size input.text_rows_per_caption
        # (text packing) a little above it.
        text_rows_per_caption=jnp.sum(
            batch['text/tokens'] != self.config.model.text.pad_id)
        / batch['text/tokens'].shape[-1] / jnp.maximum(jnp.sum(batch['text/valid']), 1))
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    if 'teacher' in state:
      new_state['teacher'] = teacher_lib.update(
          state['teacher'], params, self.config.model.distill, targets)
    return new_state, step_metrics

  def lower_step(self, patch_size: int, distilling: bool = False):
    """The train step lowered for the abstract state and batch at `patch_size`,
    with the teacher objectives when `distilling`."""
    jitted = jax.jit(functools.partial(self._train_step, distilling=distilling),
                     donate_argnums=0,
                     in_shardings=(self.state_sharding, self.batch_sharding),
                     out_shardings=(self.state_sharding, self.replicated))
    return jitted.lower(self.abstract_state, self.abstract_batch(patch_size))

  def compile_step(self, patch_size: int, distilling: bool = False):
    """The compiled train step; CPU-only XLA options apply on CPU meshes only."""
    return xla_options.compile_step(self.lower_step(patch_size, distilling),
                                    self.config.cpu_compiler_options,
                                    sharding.platform(self.mesh))

  def compiled_step(self, state, batch, step: int | None = None):
    """(compiled step, its model FLOPs) for this batch's patch size (FlexiViT:
    one per p) and phase: before model.distill.start_step the step has no
    teacher forward, from it on it does. `step` is the state's, when the
    caller knows it (else it is read off the state, only with distill on)."""
    if step is None and self.distilling_ever:
      step = int(jax.device_get(state['step']))
    distilling = self.distilling_at(step)
    spec = batch_lib.spec_of(batch)
    key = (spec.patch_size, distilling)
    if key not in self._compiled:
      flops = flops_lib.training_flops(self.config.model, spec,
                                       frozen=self.frozen_towers,
                                       distilling=distilling)
      self._compiled[key] = (self.compile_step(spec.patch_size, distilling),
                             float(flops))
    return self._compiled[key]

  # --- the loop ------------------------------------------------------------

  def _request_stop(self, signum, frame):  # pylint: disable=unused-argument
    log.warning('signal %d: saving a checkpoint and stopping', signum)
    self._stop_requested = True

  def _all_agree_to_stop(self) -> bool:
    if jax.process_count() == 1:
      return self._stop_requested
    flags = multihost_utils.process_allgather(np.array(self._stop_requested))
    return bool(np.any(flags))

  def _save(self, step: int, state) -> None:
    # Every host's pipeline position, in process order: each resumes its own.
    data_state = {'processes': sharding.gather_from_processes(
        self.pipeline.get_state())}
    self.checkpointer.save(step, state, data_state, self.config)

  def _own_data_state(self, data_state: dict) -> dict:
    """This process's pipeline state out of a checkpoint's data state."""
    states = data_state.get('processes', [data_state])
    if len(states) != self.process_count:
      raise ValueError(
          f'the checkpoint was written by {len(states)} processes and this run '
          f'has {self.process_count}: the input pipelines cannot resume '
          'exactly; resume with the same number of hosts')
    return states[jax.process_index()]

  def run(self, hooks=()) -> RunResult:
    """Trains to config.total_steps (or until preempted). `hooks` get (step, state)."""
    config = self.config
    peak = metrics_lib.measure_matmul_peak() if jax.default_backend() == 'cpu' else None
    throughput = metrics_lib.Throughput(config.total_steps, peak)
    previous = signal.signal(signal.SIGTERM, self._request_stop), signal.signal(
        signal.SIGINT, self._request_stop)
    start_time = time.perf_counter()
    writer = None
    pending = None  # (step, device metrics, host stats): logged one step late
    last = {}
    preempted = False
    try:
      state = self.restore_or_init()
      step = int(jax.device_get(state['step']))
      first_step = step
      # Records past the restored step are redone now: the writer drops them.
      writer = metrics_lib.MetricsWriter(
          self.workdir, enabled=jax.process_index() == 0, resume_step=step)
      while step < config.total_steps:
        if self._all_agree_to_stop():
          preempted = True
          break
        local = next(self.pipeline)
        batch = sharding.make_global_batch(model_inputs(local), self.mesh)
        compiled, flops = self.compiled_step(state, batch, step)
        state, device_metrics = compiled(state, batch)
        step += 1
        if pending is not None:
          last = self._log(writer, throughput, *pending)
        pending = (step, device_metrics, flops)
        if step % config.checkpoint.every == 0 or step == config.total_steps:
          last = self._log(writer, throughput, *pending)
          pending = None
          self._save(step, state)
          writer.sync()  # a gs:// workdir's logs go up with each checkpoint
        if self._eval_due(step):
          last.update(self._evaluate(writer, step, state))
        for hook in hooks:
          hook(step, state)
      if pending is not None:  # stopped by a signal: its interval is cut short
        last = self._log(writer, throughput, *pending, cut_short=True)
      if preempted and self.checkpointer.latest_step() != step:
        self._save(step, state)
    finally:
      self.pipeline.close()
      try:
        self.checkpointer.close()  # raises if a background save failed
      finally:
        if writer is not None:
          self._close_writer(writer, failing=sys.exc_info()[0] is not None)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    self.state = state
    return RunResult(steps=step - first_step, seconds=time.perf_counter() - start_time,
                     preempted=preempted, final_metrics=last)

  @staticmethod
  def _close_writer(writer, failing: bool) -> None:
    """Closes the metrics writer. A run already failing (a full disk, say)
    reports that failure, not a second one from flushing its logs."""
    try:
      writer.close()
    except OSError as e:
      if not failing:
        raise
      log.error('the metrics could not be flushed either: %s', e)

  # --- evaluation ----------------------------------------------------------

  def _eval_due(self, step: int) -> bool:
    every = self.config.evals.every
    return step == self.config.total_steps or bool(every and step % every == 0)

  def _evaluate(self, writer, step: int, state) -> dict:
    """Held-out loss (and caption perplexity, referring-expression accuracy)
    and synthetic zero-shot, as configured; logged under eval/."""
    results = {}
    if self.config.evals.heldout.kind:
      results.update(self.heldout_metrics(state['params']))
    if self.config.evals.zero_shot_examples:
      results.update(self.zero_shot(state['params']))
    if results:
      writer.write(step, results)
      if jax.process_index() == 0:
        metrics_lib.print_line(f'eval at step {step}: ' + ', '.join(
            f'{k} {v:.4f}' for k, v in results.items() if isinstance(v, float)))
    return results

  def heldout_loss(self, params) -> float:
    """Mean loss over evals.heldout_batches batches of the held-out source."""
    return self.heldout_metrics(params)['eval/loss']

  def heldout_metrics(self, params) -> dict:
    """Over evals.heldout_batches batches of the held-out source:
    'eval/loss', their mean loss, and with evals.caption_perplexity
    'eval/caption_perplexity', exp of the mean token cross-entropy of the
    captioning decoder over all their caption tokens (no CapPa captions).
    With evals.box_accuracy, over all their ARef tasks (evaluate/referring.py):
    'eval/box_accuracy', the share whose greedy box has IoU >= 0.5 with the
    true one, 'eval/box_iou', the mean IoU, and 'eval/aref_tasks', how many."""
    if not hasattr(self, '_heldout_fn'):
      def heldout(p, batch):
        loss, metrics = self._loss(p, batch)
        if 'caption_loss' not in metrics:
          return loss, 0.0, 0
        count = metrics['caption_targets']
        return loss, metrics['caption_loss'] * count, count
      self._heldout_fn = jax.jit(heldout)
      self._box_fn = jax.jit(functools.partial(referring.box_scores, self.model))
    source = sources.make_source(self.config.evals.heldout)
    losses_, caption_ce, caption_targets = [], 0.0, 0
    box_totals = {'correct': 0, 'iou': 0.0, 'tasks': 0}
    with make_pipeline(self.config, source, rows=self.local_rows,
                       groups=self.local_groups) as heldout_batches:
      for _ in range(self.config.evals.heldout_batches):
        local = next(heldout_batches)
        batch = sharding.make_global_batch(model_inputs(local), self.mesh)
        loss, ce, count = jax.device_get(self._heldout_fn(params, batch))
        losses_.append(float(loss))
        caption_ce, caption_targets = caption_ce + float(ce), caption_targets + int(count)
        if self.config.evals.box_accuracy:
          scores = jax.device_get(self._box_fn(params, batch))
          box_totals = {k: v + scores[k].item() for k, v in box_totals.items()}
    results = {'eval/loss': float(np.mean(losses_))}
    if self.config.evals.caption_perplexity:
      results['eval/caption_perplexity'] = math.exp(
          caption_ce / max(caption_targets, 1))
    if self.config.evals.box_accuracy:
      results.update(box_results(**box_totals))
    return results

  def zero_shot(self, params) -> dict:
    """Synthetic zero-shot and retrieval, the demo's numbers."""
    if self.config.input.source.kind != 'synthetic':
      log.warning('evals.zero_shot_examples needs a synthetic source; skipped')
      return {}
    from lit_navit.evaluate import demo_eval  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      # Each host holds only its shards of the parameters: gather them, and
      # every host computes the same (small) evaluation.
      params = multihost_utils.process_allgather(params, tiled=True)
    metrics = demo_eval.synthetic_metrics(self.config, params,
                                          self.config.evals.zero_shot_examples)
    return {f'eval/{k}': v for k, v in metrics.items() if not isinstance(v, dict)}

  def _log(self, writer, throughput, step, device_metrics, flops, cut_short=False) -> dict:
    """Pulls one step's metrics off the device, checks the loss, writes a record."""
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    throughput.add(scalars['images'], scalars['tokens'], flops)
    finite = math.isfinite(scalars['loss'])
    if finite and step % self.config.log_every and step != self.config.total_steps:
      return scalars
    lrs = {pattern: float(fn(step - 1)) for pattern, fn in self.schedules.items()}
    scalars['lr'] = next(iter(lrs.values()), 0.0)
    if len(lrs) > 1:
      scalars.update({f'lr/{pattern}': lr for pattern, lr in lrs.items()})
    scalars.update({f'skipped/{k}': v for k, v in self.pipeline.skipped.counts.items()})
    scalars.update(throughput.report(step, cut_short))
    writer.write(step, scalars)  # a non-finite step's record too: it explains the stop
    if not finite:
      raise NonFiniteLoss(f"loss is {scalars['loss']} at step {step}; stopping. "
                          + self._last_good_checkpoint())
    if jax.process_index() == 0:
      metrics_lib.print_line(metrics_lib.console_line(step, self.config.total_steps, scalars))
    return scalars

  def _last_good_checkpoint(self) -> str:
    latest = self.checkpointer.latest_step()
    if latest is None:
      return f'There is no checkpoint yet in {self.checkpointer.directory}.'
    return f'The last good checkpoint is step {latest} in {self.checkpointer.directory}.'


def box_results(correct: int, iou: float, tasks: int) -> dict:
  """evals.box_accuracy's metrics from its sums over the held-out ARef
  tasks; without a task (a held-out source without boxes) only the count."""
  results = {'eval/aref_tasks': int(tasks)}
  if not tasks:
    log.warning('evals.box_accuracy: the held-out batches hold no referring '
                'expression (does evals.heldout name a source with boxes?)')
    return results
  results['eval/box_accuracy'] = float(correct / tasks)
  results['eval/box_iou'] = float(iou / tasks)
  return results


def frozen_towers(schedule, params) -> tuple[str, ...]:
  """The towers ('img', 'txt') whose every parameter has a None schedule."""
  groups = rules.match_rules(
      params, [(pattern, sched is None) for pattern, sched in optim.schedule_rules(schedule)],
      'config.optim.schedule')
  return tuple(tower for tower in ('img', 'txt')
               if all(jax.tree.leaves(groups[tower])))


def _zeros(abstract: dict) -> dict:
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in abstract.items()}
