"""SILC self-distillation and TIPS masked prediction against the EMA teacher.

Packed batches carry local crops (image/parent) and token masks
(image/masked) as batch.py's contract describes them; until the pipeline
makes them, the tests build them by hand.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lit_navit import distill
from lit_navit import sharding
from lit_navit import teacher as teacher_lib
from lit_navit.models import flops
from lit_navit.models import navit
from lit_navit.models import two_towers
from model_batches import pack, random_image

P = 4
K = 12  # prototypes


def tiny_config(weight=0.5, masked_weight=2.0):
  config = two_towers.default_config()
  config.image.variant = f'mu/{P}'
  config.image.max_grid = 4
  config.text.variant = 'mu'
  config.text.vocab_size = 16
  config.text.max_len = 4
  config.image.scan = False  # one block: unrolled compiles faster
  config.embed_dim = 8
  d = config.distill
  d.weight, d.masked_weight = weight, masked_weight
  d.head.hidden_dim, d.head.bottleneck_dim, d.head.prototypes = 16, 8, K
  # Milder than the defaults so that float32 differences stay small.
  d.teacher_temp, d.student_temp = 0.5, 0.7
  return config


def mask_tokens(segment, parent, rng, ratio=0.5):
  """image/masked: round(ratio * n) random tokens of each global image."""
  masked = np.zeros(segment.shape, bool)
  for r in range(segment.shape[0]):
    for k in range(1, int(segment[r].max()) + 1):
      if parent[r, k - 1]:
        continue
      tokens = np.flatnonzero(segment[r] == k)
      masked[r, rng.choice(tokens, max(1, round(ratio * tokens.size)), replace=False)] = True
  return masked


def crop_batch(images, parents, tokens_per_row, slots, seed=0, groups=1):
  """A packed batch of `images` (per row, patch grids) whose slots have
  `parents` (per row, image/parent), with image/masked drawn by `seed`."""
  batch = pack(images, tokens_per_row=tokens_per_row, slots=slots, groups=groups)
  parent = np.zeros(batch['valid'].shape, np.int32)
  for r, row in enumerate(parents):
    parent[r, :len(row)] = row
  batch['image/parent'] = parent
  batch['image/masked'] = mask_tokens(batch['image/segment'], parent,
                                      np.random.default_rng(seed))
  return batch


def sample_images(seed=0):
  rng = np.random.default_rng(seed)
  im = lambda rows, cols: random_image(rng, rows, cols, P)
  # Row 0: global A, a crop of A, global B, a crop of B; row 1: global C and two crops of it.
  images = [[im(2, 3), im(1, 2), im(2, 2), im(1, 1)], [im(3, 3), im(2, 2), im(1, 2)]]
  parents = [[0, 1, 0, 3], [0, 1, 1]]
  return images, parents


def sample_batch(seed=0):
  images, parents = sample_images(seed)
  return crop_batch(images, parents, tokens_per_row=16, slots=4)


@functools.lru_cache(maxsize=None)
def model_params_teacher(weight=0.5, masked_weight=2.0):
  """The model, its params, and a teacher that differs from the student
  (params perturbed, centers nonzero)."""
  config = tiny_config(weight, masked_weight)
  model = two_towers.TwoTowers(config)
  params = jax.jit(model.init)(jax.random.key(0), sample_batch())['params']
  teacher = teacher_lib.init(params, config)
  leaves, tree = jax.tree.flatten(teacher['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  teacher['params'] = jax.tree.unflatten(tree, [
      x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  teacher['center'] = 0.1 * jax.random.normal(jax.random.key(2), (K,))
  teacher['patch_center'] = 0.1 * jax.random.normal(jax.random.key(3), (K,))
  return config, model, params, teacher


def packed_loss(config, model, params, teacher, batch):
  """(weighted total, metrics) as the trainer's step computes the distillation part."""
  _, _, extras = model.apply({'params': params}, batch)
  targets = teacher_lib.targets(config, teacher, batch)
  return distill.losses(config, params, batch, extras['slots'], targets)


def packed_terms(config, model, params, teacher, batch):
  @jax.jit
  def terms(params, teacher, batch):
    _, _, extras = model.apply({'params': params}, batch)
    targets = teacher_lib.targets(config, teacher, batch)
    return distill.terms(config, params, batch, extras['slots'], targets)
  return terms(params, teacher, batch)


# --- the dense reference: one image per forward ---------------------------

ALONE = 9  # tokens of the largest test image: each image alone fills such a row


def _alone(patches, grid):
  """One image (patches [n, p*p*3]) as a one-row batch of its own, padded to
  ALONE tokens (so that one compiled function serves every image)."""
  rows, cols = grid
  n = rows * cols
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  pad = ((0, ALONE - n), (0, 0))
  return (np.pad(patches, pad)[None], np.pad(np.stack([y.ravel(), x.ravel()], -1), pad)[None],
          (np.arange(ALONE) < n).astype(np.int32)[None], np.array([[[rows, cols]]], np.int32))


def _images_of(batch):
  """[(row, slot k (1-based), patches [n, D], grid, token positions)] of every image."""
  out = []
  for r in range(batch['valid'].shape[0]):
    for k in range(1, int(batch['image/segment'][r].max()) + 1):
      where = np.flatnonzero(batch['image/segment'][r] == k)
      out.append((r, k, batch['image/patches'][r, where], tuple(batch['image/grid'][r, k - 1]),
                  where))
  return out


def _head(config, name, params, x):
  return two_towers.distill_heads(config)[name].apply({'params': params[name]}, x)


def dense_losses(config, params, teacher, batch):
  """(distill_loss, masked_loss) image by image: each crop against its own
  parent's teacher output, each global image's masked tokens on its own."""
  d = config.distill
  tower = two_towers.image_tower(config)

  @jax.jit
  def pooled_logits(p, inputs):
    return _head(config, 'distill_head', p, tower.apply({'params': p['img']}, *inputs)[0, 0])

  @jax.jit
  def token_logits(p, inputs, masked):
    _, tokens = tower.apply({'params': p['img']}, *inputs, return_tokens=True, masked=masked)
    return _head(config, 'patch_head', p, tokens[0])

  tparams = teacher['params']
  images = {(r, k): (patches, grid, where) for r, k, patches, grid, where in _images_of(batch)}
  crop_ce = []
  masked_ce = []
  for (r, k), (patches, grid, where) in images.items():
    parent = int(batch['image/parent'][r, k - 1])
    if parent:  # a crop: the student on the crop, the teacher on its parent
      ppatches, pgrid, _ = images[(r, parent)]
      target = jax.nn.softmax((pooled_logits(tparams, _alone(ppatches, pgrid))
                               - teacher['center']) / d.teacher_temp)
      logp = jax.nn.log_softmax(pooled_logits(params, _alone(patches, grid)) / d.student_temp)
      crop_ce.append(-jnp.sum(target * logp))
    else:  # a global image: its masked tokens
      mask = batch['image/masked'][r, where]
      target = jax.nn.softmax((token_logits(tparams, _alone(patches, grid), None)
                               - teacher['patch_center']) / d.teacher_temp)
      masked = np.pad(mask, (0, ALONE - mask.size))[None]
      logp = jax.nn.log_softmax(token_logits(params, _alone(patches, grid), masked)
                                / d.student_temp)
      ce = -jnp.sum(target * logp, -1)
      masked_ce.extend(ce[i] for i in np.flatnonzero(mask))
  return jnp.mean(jnp.stack(crop_ce)), jnp.mean(jnp.stack(masked_ce))


def test_losses_equal_the_dense_reference_in_value_and_gradient():
  config, model, params, teacher = model_params_teacher()
  batch = sample_batch()
  assert batch['image/masked'].sum() == 3 + 2 + 4  # round(n / 2) of 6, 4 and 9 tokens

  def packed(p):
    return packed_loss(config, model, p, teacher, batch)

  def dense(p):
    distill_loss, masked_loss = dense_losses(config, p, teacher, batch)
    return 0.5 * distill_loss + 2 * masked_loss, (distill_loss, masked_loss)

  (_, metrics), grads = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
  (_, (distill_ref, masked_ref)), grads_ref = jax.value_and_grad(dense, has_aux=True)(params)
  np.testing.assert_allclose(metrics['distill_loss'], distill_ref, rtol=1e-5)
  np.testing.assert_allclose(metrics['masked_loss'], masked_ref, rtol=1e-5)
  assert float(distill_ref) > 0 and float(masked_ref) > 0
  for name in ('img', 'distill_head', 'patch_head'):
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_ref[name])), name
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, grads_ref)
  # The mask token learns only from the masked pass, the text tower from neither.
  assert np.abs(grads['img']['mask_token']).max() > 0
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(grads['txt']))


def test_nothing_leaks_between_the_images_of_a_row():
  """Another image of the row (global B, and so its crop's target) changes
  neither crop A's distillation term nor A's masked-prediction terms."""
  config, model, params, teacher = model_params_teacher()
  batch = sample_batch()
  changed = dict(batch, **{'image/patches': batch['image/patches'].copy()})
  segment = batch['image/segment'][0]
  changed['image/patches'][0, segment >= 3] *= -0.5  # global B and its crop
  before = packed_terms(config, model, params, teacher, batch)
  after = packed_terms(config, model, params, teacher, changed)
  np.testing.assert_array_equal(before['distill'][0, 1], after['distill'][0, 1])
  a_masked = (segment == 1) & batch['image/masked'][0]
  assert a_masked.sum() == 3
  np.testing.assert_array_equal(before['masked'][0][a_masked], after['masked'][0][a_masked])
  # ...while B's own terms do change: the change reached the model.
  assert before['distill'][0, 3] != after['distill'][0, 3]
  b_masked = (segment == 3) & batch['image/masked'][0]
  assert np.all(before['masked'][0][b_masked] != after['masked'][0][b_masked])


def test_masked_tokens_keep_their_position_and_lose_their_pixels():
  """The mask token replaces the patch embedding before the position
  embedding: a masked token's pixels do not matter, its place does."""
  rng = np.random.default_rng(0)
  tower = navit.NaViT(width=32, depth=1, mlp_dim=64, num_heads=2, base_patch_size=P,
                      max_grid=4, pool='mean', mask_token=True)
  image = random_image(rng, 2, 3, P)
  batch = pack([[image, random_image(rng, 3, 2, P)]], tokens_per_row=16, slots=2)
  inputs = (batch['image/patches'], batch['image/yx'], batch['image/segment'],
            batch['image/grid'])
  params = tower.init(jax.random.key(0), *inputs)
  masked = batch['image/segment'] == 1
  masked[0, 0] = False  # image 1: every token masked but the first
  out = tower.apply(params, *inputs, masked=masked)
  other_pixels = batch['image/patches'].copy()
  other_pixels[masked] = -other_pixels[masked]
  out_other = tower.apply(params, other_pixels, *inputs[1:], masked=masked)
  np.testing.assert_allclose(out, out_other, rtol=1e-6)
  assert not np.allclose(out, tower.apply(params, *inputs))  # the mask did something
  # Every token of both images masked: only the position embeddings tell them apart.
  everything = tower.apply(params, *inputs, masked=batch['image/segment'] > 0)
  assert not np.allclose(everything[0, 0], everything[0, 1], atol=1e-4)
  with pytest.raises(ValueError, match='mask_token'):
    navit.NaViT(width=32, depth=1, mlp_dim=64, num_heads=2, base_patch_size=P,
                max_grid=4).init(jax.random.key(0), *inputs, masked=masked)


def test_the_teacher_gets_no_gradient():
  config, model, params, teacher = model_params_teacher()
  batch = sample_batch()
  grads = jax.jit(jax.grad(lambda t: packed_loss(config, model, params, t, batch)[0]))(
      teacher)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))


def _ema_formula(m):
  """t <- m t + (1 - m) s in float32, written out independently of teacher.py.

  Evaluated by XLA, not numpy: XLA:CPU contracts m*t + (1-m)*s into a fused
  multiply-add, which rounds once where numpy rounds each product (a last-bit
  difference in about a quarter of the elements).
  """
  return jax.jit(lambda t, s: jax.tree.map(
      lambda a, b: jnp.float32(m) * a + jnp.float32(1 - m) * b, t, s))


def test_ema_update_is_exact():
  config, _, params, teacher = model_params_teacher()
  student = jax.tree.map(lambda x: x * 1.5 + 0.01, params)
  m = 0.996
  with config.unlocked():
    config = config.copy_and_resolve_references()
  config.distill.ema_momentum = m
  updated = jax.jit(lambda t, s: teacher_lib.update(t, s, config.distill))(teacher, student)
  expected = _ema_formula(m)(teacher['params'], teacher_lib.student_part(student))
  assert set(updated['params']) == {'img', 'distill_head', 'patch_head'}
  jax.tree.map(np.testing.assert_array_equal, updated['params'], expected)
  # ...which is the formula to float32's last bit.
  jax.tree.map(lambda a, t, s: np.testing.assert_allclose(
      a, np.float32(m) * np.asarray(t) + np.float32(1 - m) * np.asarray(s), rtol=2e-7,
      atol=1e-9), updated['params'], teacher['params'], teacher_lib.student_part(student))
  # Without the step's targets (before start_step) the centers stay.
  np.testing.assert_array_equal(updated['center'], teacher['center'])
  np.testing.assert_array_equal(updated['patch_center'], teacher['patch_center'])


def test_center_update_is_the_ema_of_the_teachers_mean_over_global_images():
  config, _, params, teacher = model_params_teacher()
  batch = sample_batch()
  updated = jax.jit(lambda t, p, b: teacher_lib.update(
      t, p, config.distill, teacher_lib.targets(config, t, b)))(teacher, params, batch)
  tower = two_towers.image_tower(config)

  @jax.jit
  def alone(tparams):
    """The teacher's logits of each global image, and of each of its tokens, alone."""
    logits, patch_logits = [], []
    for r, k, patches, grid, where in _images_of(batch):
      if batch['image/parent'][r, k - 1]:
        continue
      pooled, tokens = tower.apply({'params': tparams['img']}, *_alone(patches, grid),
                                   return_tokens=True)
      logits.append(_head(config, 'distill_head', tparams, pooled[0, 0]))
      patch_logits.append(_head(config, 'patch_head', tparams, tokens[0, :where.size]))
    return jnp.stack(logits), jnp.concatenate(patch_logits)
  logits, patch_logits = alone(teacher['params'])
  assert len(logits) == 3 and len(patch_logits) == 6 + 4 + 9
  m = config.distill.center_momentum
  for center, mean in (('center', np.mean(logits, 0)),
                       ('patch_center', np.mean(patch_logits, 0))):
    np.testing.assert_allclose(updated[center], m * teacher[center] + (1 - m) * mean,
                               rtol=1e-5, atol=1e-6, err_msg=center)
    assert np.abs(updated[center] - teacher[center]).max() > 1e-3


def test_off_means_no_new_params_and_no_teacher_fields():
  config = tiny_config(0.0, 0.0)
  batch = sample_batch()
  params = jax.eval_shape(two_towers.TwoTowers(config).init, jax.random.key(0), batch)
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    del plain['distill']
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
      two_towers.TwoTowers(plain).init, jax.random.key(0), batch))
  assert not two_towers.distill_on(config)
  only_crops = model_params_teacher(1.0, 0.0)[2]
  assert 'distill_head' in only_crops and 'patch_head' not in only_crops
  assert 'mask_token' not in only_crops['img']


@pytest.mark.parametrize('key, value', [
    ('weight', -1.0), ('masked_weight', float('nan')), ('start_step', -1),
    ('ema_momentum', 1.5), ('center_momentum', -0.1), ('teacher_temp', 0.0),
    ('student_temp', -1.0), ('head.prototypes', 0)])
def test_bad_values_name_the_key(key, value):
  config = tiny_config()
  node = config.distill.head if key.startswith('head.') else config.distill
  node[key.rpartition('.')[2]] = value
  with pytest.raises(ValueError, match=f'model.distill.{key}'):
    two_towers.check_distill(config)


def test_a_batch_without_the_keys_names_the_config():
  config, model, params, teacher = model_params_teacher()
  del model, params
  batch = sample_batch()
  del batch['image/parent']
  with pytest.raises(ValueError, match='model.distill.weight.*image/parent'):
    teacher_lib.targets(config, teacher, batch)


def test_flops_count_the_teacher_and_the_masked_pass():
  from lit_navit.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  spec = batch_lib.spec_of(sample_batch())
  base = flops.training_flops(tiny_config(0.0, 0.0), spec)
  for weight, masked_weight in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
    config = tiny_config(weight, masked_weight)
    assert flops.training_flops(config, spec) == base  # before start_step
    extra = flops.training_flops(config, spec, distilling=True) - base
    assert extra == flops.distill_flops(config, spec)
  img = flops.image_forward_flops(tiny_config(), spec)
  crops_only = flops.distill_flops(tiny_config(1.0, 0.0), spec)
  both = flops.distill_flops(tiny_config(1.0, 1.0), spec)
  # At least the teacher's forward; masked prediction adds a student pass
  # with its backward (3 x its encoder).
  assert crops_only > img
  assert both - crops_only > 3 * flops.image_forward_flops(tiny_config(), spec, pooled=False)


@pytest.mark.slow  # two compiles of the loss and its gradient
def test_sharded_over_data_and_fsdp_equals_one_device():
  config, model, params, teacher = model_params_teacher()
  rng = np.random.default_rng(3)
  im = lambda rows, cols: random_image(rng, rows, cols, P)
  rows = [[im(2, 2), im(1, 2), im(2, 3)], [im(3, 3), im(1, 1)]] * 4
  parents = [[0, 1, 0], [0, 1]] * 4
  batch = crop_batch(rows, parents, tokens_per_row=12, slots=3, seed=3, groups=8)

  def loss(p, t, b):
    total, metrics = packed_loss(config, model, p, t, b)
    # The centers' batch means are over the whole batch too.
    targets = teacher_lib.targets(config, t, b)
    return total, (metrics, targets['mean'], targets['patch_mean'])

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, teacher, batch)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'mesh': [('data', 2), ('fsdp', 4)]}))
  param_sh = sharding.param_shardings(params, [('.*', 'fsdp')], mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  teacher_sh = teacher_lib.shardings(param_sh, replicated)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(param_sh))
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(jax.value_and_grad(loss, has_aux=True),
                 in_shardings=(param_sh, teacher_sh, batch_sh))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    (total_sh, metrics_sh), grads_sh = step(
        jax.device_put(params, param_sh), jax.device_put(teacher, teacher_sh),
        jax.device_put(batch, batch_sh))
  np.testing.assert_allclose(total_sh, total, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               metrics_sh, metrics)
  assert set(metrics[0]) == {'distill_loss', 'masked_loss'}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_sh, grads)


# --- the trainer: phases, the teacher in the state, resume ---------------

START = 2


def _train_config():
  import tiny_config  # pylint: disable=g-import-not-at-top
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(tiny_config.__file__ + ':steps=4,every=2,fsdp=2')
  d = config.model.distill
  d.weight, d.masked_weight, d.start_step = 0.5, 0.5, START
  d.head.hidden_dim, d.head.bottleneck_dim, d.head.prototypes = 16, 8, K
  # The pipeline's own local crops and token masks (data/crops.py, masking.py).
  config.input.local_crops.update(count=1, max_tokens=4)
  config.input.mask_ratio = 0.5
  config_lib.check_config(config)
  return config


def _trainer(workdir):
  from lit_navit import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  return trainer_lib.Trainer(_train_config(), workdir)


def _host(state):
  return jax.tree.map(np.asarray, jax.device_get(state))


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_training_across_start_step_and_an_exact_resume(tmp_path):
  trainer = _trainer(str(tmp_path / 'reference'))
  assert set(trainer.abstract_state) == {'step', 'params', 'opt_state', 'teacher'}
  states = [_host(trainer._init_fn())]  # what run() starts from  # pylint: disable=protected-access
  trainer.run(hooks=[lambda step, state: states.append(_host(state))])
  with open(tmp_path / 'reference' / 'metrics.jsonl', encoding='utf-8') as f:
    records = [__import__('json').loads(line) for line in f]

  # Before start_step no teacher objective runs; from it on both do.
  assert [('distill_loss' in r, 'masked_loss' in r) for r in records] == (
      [(False, False)] * START + [(True, True)] * 2)
  for r in records[START:]:
    assert np.isfinite(r['distill_loss']) and np.isfinite(r['masked_loss'])
    assert r['distill_loss'] > 0 and r['masked_loss'] > 0
  # The teacher is the EMA of the student's trajectory, from a copy of it.
  ema = _ema_formula(trainer.config.model.distill.ema_momentum)
  teacher = teacher_lib.student_part(states[0]['params'])
  jax.tree.map(np.testing.assert_array_equal, states[0]['teacher']['params'], teacher)
  for step, state in enumerate(states[1:], 1):
    teacher = ema(teacher, teacher_lib.student_part(state['params']))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-9),
                 state['teacher']['params'], teacher)
    # The centers move only from start_step on.
    moved = [np.any(state['teacher'][c] != 0) for c in ('center', 'patch_center')]
    assert moved == [step > START] * 2, step

  # Killed after the checkpoint at step 2, then resumed: bitwise the same
  # state, the teacher and its centers included.
  workdir = str(tmp_path / 'resumed')
  killed = _trainer(workdir)

  def stop(step, state):
    del state
    if step == 3:
      raise _Stop
  with pytest.raises(_Stop):
    killed.run(hooks=[stop])
  resumed = _trainer(workdir)
  result = resumed.run()
  assert result.steps == 2
  final = _host(resumed.state)
  assert jax.tree.structure(final) == jax.tree.structure(states[-1])
  jax.tree.map(np.testing.assert_array_equal, final, states[-1])


def test_without_distill_the_state_has_no_teacher(tmp_path):
  from lit_navit import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  config = _train_config()
  config.model.distill.weight = config.model.distill.masked_weight = 0.0
  config.input.local_crops.count, config.input.mask_ratio = 0, 0.0
  trainer = trainer_lib.Trainer(config, str(tmp_path))
  assert set(trainer.abstract_state) == {'step', 'params', 'opt_state'}
  assert not {'distill_head', 'patch_head'} & set(trainer.abstract_state['params'])
  assert 'mask_token' not in trainer.abstract_state['params']['img']
