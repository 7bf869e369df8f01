"""Planning on TPU without one: the trainer's own step compiled for a TPU
topology by libtpu on this CPU host, its collectives counted from the HLO."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny_config
from lit_navit import plan
from lit_navit.tpu import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def v5e_2x2():
  return plan.topology_devices('v5e:2x2')


def test_collective_bytes_count_every_loop_trip(v5e_2x2):
  mesh = jax.make_mesh((4,), ('x',), devices=v5e_2x2)

  def per_device(x):
    def body(carry, _):
      # One all-gather of the [64, 128] f32 array a trip: 3/4 of it arrives.
      full = jax.lax.all_gather(carry, 'x', tiled=True)
      return carry + jnp.sin(full).reshape(4, 16, 128).sum(0), None
    return jax.lax.scan(body, x, None, length=5)[0]

  step = jax.shard_map(per_device, mesh=mesh, in_specs=P('x'), out_specs=P('x'))
  sharded = NamedSharding(mesh, P('x'))
  abstract = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sharded)
  compiled = jax.jit(step).lower(abstract).compile()
  moved = collectives.from_hlo_text(compiled.as_text())
  assert moved.unknown_trip_counts == 0
  assert moved.bytes_by_kind['all-gather'] == 5 * 64 * 128 * 4 * 3 // 4
  assert moved.total == moved.bytes_by_kind['all-gather']


def test_replica_group_spellings():
  line = ' = f32[8,16]{1,0} all-reduce(%x), replica_groups={}'
  for groups, n in (("mesh['data'=4,'fsdp'=2] {'data','fsdp'}", 8),
                    ("mesh['data'=4,'fsdp'=2] {'fsdp'}", 2),
                    ("mesh['data'=4,'fsdp'=2], device_ids=([2,4]T(1,0)) {'data'}", 4),
                    ('[2,4]<=[8]', 4), ('{{0,1,2},{3,4,5}}', 3)):
    text = ('ENTRY %main (p: f32[8,16]) -> f32[8,16] {\n  %r'
            + line.replace('{}', groups) + '\n}\n')
    assert collectives.from_hlo_text(text).bytes_by_kind['all-reduce'] == int(
        8 * 16 * 4 * 2 * (n - 1) / n)


# TPU's forms: an all-gather run asynchronously as fusions that start,
# continue and finish it, each holding a copy of the op under one channel;
# a reduce-scatter as a fusion slicing its all-reduce to the chip's shard.
_ASYNC_AND_SCATTER_HLO = '''
%start (p0: bf16[4,8]) -> (bf16[4,8], bf16[16,8]) {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %cc.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%continued (p1: bf16[4,8]) -> bf16[16,8] {
  %p1 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[16,8]{1,0} all-gather(%p1), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
}

%done (p2: bf16[4,8]) -> bf16[16,8] {
  %p2 = bf16[4,8]{1,0} parameter(0)
  %all-gather.3 = bf16[16,8]{1,0} all-gather(%p2), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %cc.2 = bf16[16,8]{1,0} custom-call(%all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%all-reduce-scatter (input: bf16[16,8]) -> bf16[4,8] {
  %input = bf16[16,8]{1,0} parameter(0)
  %all-reduce.1 = bf16[16,8]{1,0} all-reduce(%input), channel_id=9, replica_groups={{0,1,2,3}}, to_apply=%add
  %zero = s32[] constant(0)
  ROOT %ds = bf16[4,8]{1,0} dynamic-slice(%all-reduce.1, %zero, %zero), dynamic_slice_sizes={4,8}
}

ENTRY %main (p: bf16[4,8]) -> bf16[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  %s = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) fusion(%p), kind=kCustom, calls=%start
  %c = bf16[16,8]{1,0} fusion(%p), kind=kOutput, calls=%continued
  %d = bf16[16,8]{1,0} fusion(%p), kind=kCustom, calls=%done
  ROOT %r = bf16[4,8]{1,0} fusion(%d), kind=kCustom, calls=%all-reduce-scatter
}
'''


def test_async_collectives_count_once_and_scatters_as_reduce_scatter():
  moved = collectives.from_hlo_text(_ASYNC_AND_SCATTER_HLO).bytes_by_kind
  assert moved['all-gather'] == 16 * 8 * 2 * 3 // 4  # once, not once a fusion
  assert moved['reduce-scatter'] == 16 * 8 * 2 * 3 // 4  # half an all-reduce
  assert moved['all-reduce'] == 0


def test_fsdp_gathers_weights_not_activations(v5e_2x2):
  # Activations (64 rows x 32 tokens x width 64 per layer) outweigh the
  # weights many times over: a step that gathers activations breaks the bound.
  config = tiny_config.get_config('batch=64,fsdp=2')
  config.model.image.update(width=64, depth=2, mlp_dim=256, num_heads=2)
  config.model.text.update(width=64, depth=2, mlp_dim=256, num_heads=2)
  result = plan.plan(config, v5e_2x2, cost_model=False)
  weights = 4 * sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(lambda: _params(config))))
  moved = result['collective_bytes_per_chip']
  # fsdp: gather the weights forward and again backward, reduce-scatter the
  # gradients; data: all-reduce those; plus the loss's small ring.
  assert moved['total'] <= 6 * weights, (moved, weights)
  # fsdp 2 gathers half of each weight at least once (in bf16: a quarter of
  # its f32 bytes) and at most twice (forward, backward), and
  # reduce-scatters the gradients.
  assert weights / 4 <= moved['all-gather'] <= weights / 2, (moved, weights)
  assert moved['reduce-scatter'] >= weights / 8, (moved, weights)
  assert result['fits'] and 0 < result['hbm_per_chip_bytes'] < result['hbm_capacity_bytes']


def _params(config):
  from lit_navit import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  return trainer_lib.Trainer(config, None).abstract_state['params']


def _run_plan(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'lit_navit.plan', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_demo_plan_for_the_smallest_topology():
  done = _run_plan('--config', 'configs/demo.py', '--topology', 'v5e:2x2', '--json')
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert result['fits'] and result['topology']['chips'] == 4
  assert result['hbm_per_chip_bytes'] > 0
  assert result['model_flops_per_step'] > 0
  # The compiled program does at least the model's work (remat adds more).
  assert result['hardware_flops_per_chip'] * 4 >= 0.9 * result['model_flops_per_step']
  assert 0 < result['projected_mfu'] < 1
  assert result['projected_step_s'] >= result['compute_s'] > 0


def test_a_bad_topology_is_one_line_and_exit_2():
  done = _run_plan('--config', 'configs/demo.py', '--topology', 'v5e:3x7x9',
                   '--nocost_model')
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e:3x7x9'")


def test_depth_extrapolation_matches_a_full_unrolled_compile(v5e_2x2):
  from lit_navit import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from lit_navit.tpu import cost_model  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config('batch=16')
  cost = lambda d_img, d_txt: cost_model.cost_of(trainer_lib.Trainer(
      plan._with_depths(config, d_img, d_txt), None,  # pylint: disable=protected-access
      devices=v5e_2x2).compile_step(8))
  depths = cost_model.depths_to_compile(3, 2)
  extrapolated = cost_model.extrapolate({d: cost(*d) for d in depths}, 3, 2)
  full = cost(3, 2)
  # FLOPs extrapolate exactly up to fusion choices; XLA's time estimate
  # carries per-op overheads that are not linear in depth (13% at this tiny
  # width on v5e, the error BENCHMARKS.md states for the method).
  assert extrapolated['flops'] == pytest.approx(full['flops'], rel=0.02)
  assert extrapolated['optimal_seconds'] == pytest.approx(full['optimal_seconds'],
                                                          rel=0.2)


def test_cost_of_adds_back_the_charge_libtpu_puts_on_concat_bitcasts(v5e_2x2):
  """An optimizer-like update of four f32 [768, 3072] arrays: libtpu moves
  them in async slices joined by ConcatBitcast calls, each of which its cost
  analysis charges -1 s. Corrected, the time is the update's HBM roofline."""
  from lit_navit.tpu import chips, cost_model  # pylint: disable=import-outside-toplevel
  replicated = NamedSharding(jax.sharding.Mesh(v5e_2x2, ('data',)), P())
  arrays = [jax.ShapeDtypeStruct((768, 3072), jnp.float32, sharding=replicated)] * 8

  def update(*a):
    params, grads = a[:4], a[4:]
    return [p - 1e-3 * g / (jnp.abs(g) + 1e-8) for p, g in zip(params, grads)]

  compiled = jax.jit(update).lower(*arrays).compile()
  assert compiled.as_text().count('custom_call_target="ConcatBitcast"') > 0
  cost = cost_model.cost_of(compiled)
  roofline = cost['bytes accessed'] / chips.CHIPS['v5e'].hbm_bytes_per_s
  assert roofline <= cost['optimal_seconds'] <= 1.5 * roofline


def test_memory_bound_bytes_skip_matmuls_and_count_every_loop_trip(v5e_2x2):
  """A 128 MiB bf16 array, too large to stay on chip: a layer norm moves at
  least its input and output through HBM, five of them in a loop five times
  that, and a matmul is no memory-bound work."""
  from lit_navit.tpu import roofline  # pylint: disable=import-outside-toplevel
  one_chip = NamedSharding(jax.sharding.Mesh(v5e_2x2[:1], ('d',)), P())
  x = jax.ShapeDtypeStruct((32768, 2048), jnp.bfloat16, sharding=one_chip)
  w = jax.ShapeDtypeStruct((2048, 3072), jnp.bfloat16, sharding=one_chip)
  size = 32768 * 2048 * 2

  def norm(x):
    y = x.astype(jnp.float32)
    y = y - y.mean(-1, keepdims=True)
    return (y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype)

  moved = lambda f, *args: roofline.memory_bound_bytes(
      jax.jit(f).lower(*args).compile().as_text())
  once = moved(norm, x)
  assert once >= 2 * size
  looped = moved(lambda x: jax.lax.fori_loop(0, 5, lambda i, y: norm(y), x), x)
  # Plus the carry copied in and out, and a few bytes of loop counter.
  assert 5 * once <= looped <= 5 * once + 2 * size + 1024
  assert moved(lambda x, w: x @ w, x, w) < 0.2 * size


def test_multi_slice_meshes_put_the_data_axis_across_slices():
  from lit_navit import sharding  # pylint: disable=import-outside-toplevel
  devices = plan.topology_devices('v5e:2x2', num_slices=2)
  config = tiny_config.get_config()
  config.mesh = [('data', 4), ('fsdp', 2)]
  mesh = sharding.make_mesh(config, devices)
  slice_of = [[d.slice_index for d in row] for row in mesh.devices]
  # Each fsdp group stays in one slice (ICI); data crosses slices (DCN).
  assert slice_of == [[0, 0], [0, 0], [1, 1], [1, 1]]
  config.mesh = [('data', 1), ('fsdp', 8)]
  with pytest.raises(ValueError, match='must divide over the 2 slices'):
    sharding.make_mesh(config, devices)


def test_a_step_that_does_not_fit_names_what_to_change(v5e_2x2):
  from lit_navit import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'demo.py'))
  config.batch_size = 131072  # ~120 GiB of temporaries on a 16 GiB chip
  result = plan.plan(config, v5e_2x2, cost_model=False)
  assert not result['fits']
  assert 'HBM' in result['compile_error']
  assert any('remat_policy' in a for a in result['advice'])
  assert any('splash' in a for a in result['advice'])
  assert any('131072' in a for a in result['advice'])
  assert 'NO: ' in plan.format_table(result)


def test_a_mistyped_config_argument_is_one_line_and_exit_2():
  done = _run_plan('--config', 'configs/demo.py:stepz=4', '--topology', 'v5e:2x2')
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith('error:')
  assert 'stepz' in done.stderr


def test_siglip2_objectives_plan_their_costliest_step(v5e_2x2, monkeypatch):
  # Decoder, self-distillation and masked prediction compile for TPU on a
  # data x fsdp mesh, and the plan is of the step with the teacher (from
  # model.distill.start_step on), the one that must fit.
  from lit_navit import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from lit_navit.models import flops  # pylint: disable=import-outside-toplevel
  config = tiny_config.get_config('batch=16,fsdp=2')
  config.model.decoder.update(weight=1.0, width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.distill.update(weight=1.0, masked_weight=1.0, start_step=10)
  config.model.distill.head.update(hidden_dim=32, bottleneck_dim=16, prototypes=64)
  config.input.local_crops.update(count=1, max_tokens=4)
  config.input.mask_ratio = 0.5
  phases = []
  compile_step = trainer_lib.Trainer.compile_step
  monkeypatch.setattr(trainer_lib.Trainer, 'compile_step',
                      lambda self, p, distilling=False: phases.append(distilling)
                      or compile_step(self, p, distilling))
  result = plan.plan(config, v5e_2x2, cost_model=False)
  assert phases == [True] and result['fits']
  from lit_navit.data import batch as batch_lib  # pylint: disable=import-outside-toplevel
  spec = batch_lib.spec_of(trainer_lib.Trainer(config, None, devices=v5e_2x2)
                           .abstract_batch(config.input.patch_sizes[0]))
  assert result['model_flops_per_step'] == flops.training_flops(
      config.model, spec, distilling=True) > flops.training_flops(config.model, spec)
