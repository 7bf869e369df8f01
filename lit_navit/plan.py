"""Plan a training run on a TPU topology without one: compile the real step.

  python -m lit_navit.plan --config configs/siglip_navit.py:variant=So400m/14 \\
      --topology v5e:16x16 --config.mesh="[('data', 16), ('fsdp', 16)]" [--json]

Builds the trainer's own mesh, shardings and train step over the devices of
a TPU topology description (libtpu compiles for it on any host: `pip install
.[tpu]`), from abstract state and batch, so nothing is allocated, and
compiles it for that TPU. Reports per-chip HBM against the chip's capacity,
the bytes each chip moves through collectives per step, the analytic model
FLOPs, and a projected step time, MFU and images/s per chip from the cost
model in tpu/cost_model.py. Exits 1, naming what to change, when the step
does not fit in HBM; 2 on a user error.
"""

import json
import contextlib
import os
import sys
import time

from absl import app
from absl import flags

from lit_navit import command_line
from lit_navit import user_errors

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined when it runs, not on import: the plan's
  functions are imported beside lit_navit.train, whose flags share names."""
  flags.DEFINE_string('topology', None, "TPU topology, e.g. 'v5e:16x16', 'v5p:4x4x4', "
                      "'v4:2x2x2', 'v6e:16x16'.")
  flags.DEFINE_integer('num_slices', 1, 'Slices of the topology (multi-slice).')
  flags.DEFINE_bool('json', False, 'Print the plan as one JSON object.')
  flags.DEFINE_bool('cost_model', True, 'Compile the unrolled depth-1/2 copies the '
                    'projected step time needs (two or three more, smaller compiles).')
  flags.DEFINE_bool('debug', False, 'Show the traceback of a user error.')
  flags.DEFINE_string('config', None, 'Config file, as path.py[:args]; '
                      '--config.a.b=value overrides a key.')


FITS, DOES_NOT_FIT = 0, 1


def topology_devices(topology: str, num_slices: int = 1):
  """The devices of a TPU topology description; ValueError naming a bad one."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices}: must be at least 1')
  kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
  try:
    with _compile_only_libtpu():
      return topologies.get_topology_desc(topology, platform='tpu', **kwargs).devices
  except Exception as e:  # libtpu's errors are RuntimeErrors of several kinds
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'--topology={topology!r}: not a TPU topology libtpu can '
                     f"compile for ({first}); e.g. 'v5e:4x4' or 'v5p:2x2x2'") from None


@contextlib.contextmanager
def _compile_only_libtpu():
  """libtpu looks for a TPU VM's metadata, and by default one process at a
  time may load it (pytest workers plan side by side); a compile-only host
  needs neither. Set only while libtpu loads: a process this one starts
  later (an eval script) would inherit them and its libtpu speak up."""
  wanted = {'TPU_SKIP_MDS_QUERY': '1', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  unset = [key for key in wanted if key not in os.environ]
  os.environ.update({key: wanted[key] for key in unset})
  try:
    yield
  finally:
    for key in unset:
      os.environ.pop(key, None)


def _with_depths(config, depth_img: int, depth_txt: int):
  """A copy of `config` whose towers are unrolled at the given depths."""
  copy = config.copy_and_resolve_references()
  for tower, depth in (('image', depth_img), ('text', depth_txt)):
    copy.model[tower].scan = False
    copy.model[tower].depth = depth
  return copy


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
          'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
          'code': m.generated_code_size_in_bytes,
          'total': (m.argument_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes + m.temp_size_in_bytes
                    + m.generated_code_size_in_bytes)}


def _advice(config, mesh, memory: dict, capacity: int) -> list[str]:
  """What to change, most effective first, for a step that does not fit."""
  advice = []
  fsdp = mesh.shape.get('fsdp', 1)
  if memory.get('arguments', 0) > capacity / 4 and fsdp < mesh.size:
    advice.append(f"shard parameters wider: raise fsdp in config.mesh (now {fsdp})")
  for tower in ('image', 'text'):
    if config.model[tower].remat_policy in ('none', 'everything_saveable'):
      advice.append(f"config.model.{tower}.remat_policy='nothing_saveable'")
  if config.model.image.attention != 'splash':
    advice.append("config.model.image.attention='splash' (no [B, H, L, L] scores)")
  advice.append(f'a smaller config.batch_size (now {config.batch_size})')
  return advice


def plan(config, devices, cost_model: bool = True) -> dict:
  """The plan of `config` on `devices` (a TPU topology's), as a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from lit_navit import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.models import variants  # pylint: disable=g-import-not-at-top
  from lit_navit.tpu import chips, collectives, cost_model as cost_lib  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_threefry_partitionable', True)

  chip = chips.of_device(devices[0])
  chip_ids = {(getattr(d, 'slice_index', 0), tuple(d.coords)) for d in devices}
  per_chip = len(devices) // len(chip_ids)  # v4 shows each TensorCore as a device
  capacity = chip.hbm_bytes // per_chip
  trainer = trainer_lib.Trainer(config, None, devices=devices)
  patch_size = config.input.patch_sizes[0]
  batch = trainer.abstract_batch(patch_size)
  spec = batch_lib.spec_of(batch)
  # With model.distill on, the step that must fit is the costliest: the one
  # from start_step on, with the teacher's forward and the masked pass.
  distilling = trainer.distilling_ever
  model_flops = flops_lib.training_flops(config.model, spec, frozen=trainer.frozen_towers,
                                         distilling=distilling)
  result = {
      'topology': {'chip': chip.name, 'chips': len(chip_ids),
                   'devices': len(devices), 'hosts': trainer.process_count,
                   'mesh': dict(trainer.mesh.shape)},
      'batch': {'rows': spec.rows, 'tokens_per_row': spec.tokens_per_row,
                'caption_rows': spec.groups * spec.captions, 'text_len': spec.text_len,
                'patch_size': patch_size},
      'hbm_capacity_bytes': capacity,
      'model_flops_per_step': model_flops,
  }
  start = time.perf_counter()
  try:
    compiled = trainer.compile_step(patch_size, distilling)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
      raise
    result.update(fits=False, compile_error=str(e).strip().splitlines()[0],
                  advice=_advice(config, trainer.mesh, {}, capacity))
    return result
  result['compile_s'] = time.perf_counter() - start
  memory = _memory(compiled)
  moved = collectives.from_hlo_text(compiled.as_text())
  result.update(
      hbm_per_chip_bytes=memory['total'] * per_chip, hbm_breakdown_bytes=memory,
      hbm_headroom=1 - memory['total'] / capacity,
      collective_bytes_per_chip=dict(moved.bytes_by_kind, total=moved.total),
      loops_with_unknown_trip_count=moved.unknown_trip_counts,
      fits=memory['total'] <= capacity)
  if not result['fits']:
    result['advice'] = _advice(config, trainer.mesh, memory, capacity)
  if not cost_model:
    return result

  start = time.perf_counter()
  depth_img = variants.tower_size(config.model.image, 'image')['depth']
  depth_txt = variants.tower_size(config.model.text, 'text')['depth']
  costs = {}
  for depths in cost_lib.depths_to_compile(depth_img, depth_txt):
    shallow = trainer_lib.Trainer(_with_depths(config, *depths), None, devices=devices)
    costs[depths] = cost_lib.cost_of(shallow.compile_step(patch_size, distilling))
  cost = cost_lib.extrapolate(costs, depth_img, depth_txt)
  pallas = 0.0
  for tower, tokens, rows in (('image', spec.tokens_per_row, spec.rows),
                              ('text', spec.text_len, spec.groups * spec.captions)):
    c = config.model[tower]
    if c.attention == 'splash':
      size = variants.tower_size(c, tower)
      pallas += cost_lib.pallas_attention_flops(
          tokens, rows / len(devices), size['width'], size['depth'],
          remat=c.remat_policy != 'none')
  projection = cost_lib.project(cost, chip, per_chip, moved.total, pallas)
  chip_count = len(chip_ids)
  step_s = projection.step_s
  images = spec.groups * spec.captions  # caption rows: the pairs a step can hold
  result.update(
      cost_model_compile_s=time.perf_counter() - start,
      hardware_flops_per_chip=projection.hardware_flops * per_chip,
      compute_s=projection.compute_s, compute_method=projection.compute_method,
      collectives_s=projection.collectives_s,
      projected_step_s=step_s,
      projected_mfu=model_flops / (step_s * chip_count * chip.peak_bf16_flops),
      projected_step_s_overlapped=projection.overlapped_s,
      projected_mfu_overlapped=model_flops / (
          projection.overlapped_s * chip_count * chip.peak_bf16_flops),
      images_per_step=images,
      images_per_s_per_chip=images / step_s / chip_count)
  # The other bound on compute (cost_model.py, step 4), with the same
  # collectives: unoverlapped and overlapped.
  roofline_steps = (projection.fusion_roofline_s + projection.collectives_s,
                    max(projection.fusion_roofline_s, projection.collectives_s))
  result.update(
      compute_s_fusion_roofline=projection.fusion_roofline_s,
      projected_mfu_fusion_roofline=[
          model_flops / (s * chip_count * chip.peak_bf16_flops) for s in roofline_steps])
  return result


GiB = 2 ** 30


def _size(n: float) -> str:
  for unit, scale in (('GiB', GiB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def format_table(result: dict) -> str:
  t, b = result['topology'], result['batch']
  rows = [('topology', f"{t['chips']} x {t['chip']} ({t['devices']} devices, "
                       f"{t['hosts']} hosts), mesh {t['mesh']}"),
          ('batch', f"{b['rows']} rows x {b['tokens_per_row']} tokens, "
                    f"{b['caption_rows']} caption rows x {b['text_len']}, p={b['patch_size']}")]
  if 'compile_error' in result:
    rows.append(('compile', result['compile_error']))
  else:
    m = result['hbm_breakdown_bytes']
    rows += [
        ('compile', f"{result['compile_s']:.1f} s"),
        ('HBM per chip', f"{_size(result['hbm_per_chip_bytes'])} of "
                         f"{_size(result['hbm_capacity_bytes'])} "
                         f"({100 * result['hbm_headroom']:.0f}% headroom): arguments "
                         f"{_size(m['arguments'])}, temporaries {_size(m['temporaries'])}"),
        ('collectives per chip', ', '.join(
            f'{k} {_size(v)}' for k, v in result['collective_bytes_per_chip'].items()
            if v) + ' per step'),
        ('model FLOPs per step', f"{result['model_flops_per_step'] / 1e12:.4g} TFLOP")]
  if 'projected_step_s' in result:
    rows += [
        ('projected step', f"{result['projected_step_s'] * 1e3:.4g} ms (compute "
                           f"{result['compute_s'] * 1e3:.4g} by "
                           f"{'XLA' if result['compute_method'] == 'xla' else 'the roofline'}"
                           f" + collectives "
                           f"{result['collectives_s'] * 1e3:.4g}; "
                           f"{result['projected_step_s_overlapped'] * 1e3:.4g} if overlapped)"),
        ('projected MFU', f"{100 * result['projected_mfu']:.1f}% "
                          f"({100 * result['projected_mfu_overlapped']:.1f}% if overlapped)"),
        ('fusion roofline', f"compute {result['compute_s_fusion_roofline'] * 1e3:.4g} ms, "
                            "MFU {:.1f}% ({:.1f}% if overlapped)".format(
                                *(100 * m for m in result['projected_mfu_fusion_roofline']))),
        ('images/s per chip', f"{result['images_per_s_per_chip']:.1f}"),
        ('cost-model compiles', f"{result['cost_model_compile_s']:.1f} s")]
  rows.append(('fits', 'yes' if result['fits'] else 'NO: ' + '; '.join(result['advice'])))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def _main(argv, overrides=()):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.topology is None:
    raise app.UsageError('--config and --topology are required')
  result = user_errors.run(_plan, FLAGS.config, overrides, debug=FLAGS.debug)
  print(json.dumps(result, indent=1) if FLAGS.json else format_table(result))
  sys.exit(FITS if result['fits'] else DOES_NOT_FIT)


def _plan(spec, overrides):
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(spec)
  config_lib.apply_overrides(config, overrides)
  config_lib.check_config(config)
  devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
  return plan(config, devices, cost_model=FLAGS.cost_model)


def main():
  _define_flags()
  command_line.run(_main)


if __name__ == '__main__':
  main()
