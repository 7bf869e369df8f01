"""Planned on TPU: the shipped recipes compiled for TPU pods by `lit_navit.plan`.

  python benchmarks/plan_tpu.py [--arms NAME ...] [--results DIR]

Each arm runs `python -m lit_navit.plan ... --json` in its own process (one
libtpu compile each, no TPU needed) and keeps its JSON in --results, so an
interrupted run resumes where it stopped; then prints one table of them
all. The figures are compiled-program memory and collectives plus the cost
model stated in lit_navit/tpu/cost_model.py: MFU by XLA's per-op estimate
and by the fusion roofline, each without and with (in brackets) collectives
overlapped.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGLIP = 'configs/siglip_navit.py'
SO400M = f'{SIGLIP}:variant=So400m/14,text_variant=So400m,batch=16384'
# SigLIP's 32k batch: ~2.85 images a 256-token row at B/16, so 11520 rows
# (divisible by 256 chips) hold ~32.8k pairs.
B16 = f'{SIGLIP}:variant=B/16,batch=11520'
SPLASH = ('--config.model.image.attention=splash',)
# The ViT baseline: one image and one caption a row, nothing packed.
PADDED = ('--config.input.images_per_row=1', '--config.input.captions_per_row=1.0',
          '--config.input.text_packing=False')
SAVE_WEIGHTS = ('--config.model.image.remat_policy=weights_saveable',
                '--config.model.text.remat_policy=weights_saveable')
FSDP16 = ("--config.mesh=[('data', 16), ('fsdp', 16)]",)

# name: (config, topology, overrides)
ARMS = {
    'so400m_v5e256_dense': (SO400M, 'v5e:16x16', FSDP16),
    'so400m_v5e256_splash': (SO400M, 'v5e:16x16', FSDP16 + SPLASH),
    # The recipe's sharding rules (attention kernels over heads), counted
    # with collectives.py's TPU forms (async pieces, mesh replica groups).
    'so400m_v5e256_dense_heads': (SO400M, 'v5e:16x16', FSDP16),
    # Keep each layer's fsdp-gathered weights for the backward pass instead
    # of gathering them again for remat's recompute.
    'so400m_v5e256_dense_weights_saveable': (SO400M, 'v5e:16x16', FSDP16 + SAVE_WEIGHTS),
    'b16_navit_v5e256_dense': (B16, 'v5e:16x16', ()),
    'b16_navit_v5e256_splash': (B16, 'v5e:16x16', SPLASH),
    'b16_padded_vit_v5e256_splash': (B16, 'v5e:16x16', SPLASH + PADDED),
    # B/16 fits with 74% headroom: keep activations instead of recomputing.
    'b16_navit_v5e256_splash_no_remat': (
        B16, 'v5e:16x16', SPLASH + ('--config.model.image.remat_policy=none',
                                    '--config.model.text.remat_policy=none')),
    # Between the two: keep the weight matmuls' outputs, recompute the rest.
    'b16_navit_v5e256_splash_dots_no_batch_dims': (
        B16, 'v5e:16x16', SPLASH + (
            '--config.model.image.remat_policy=dots_with_no_batch_dims_saveable',
            '--config.model.text.remat_policy=dots_with_no_batch_dims_saveable')),
    'so400m_v5p128_splash': (SO400M, 'v5p:4x4x4',
                             ("--config.mesh=[('data', 4), ('fsdp', 16)]",) + SPLASH),
    'so400m_v6e256_splash': (SO400M, 'v6e:16x16', FSDP16 + SPLASH),
}
# Dense against splash attention as rows grow: B/16 on v5e:2x2 with the same
# tokens per chip (4096) at L = 256, 1024 and 4096.
for _length, _rows in ((256, 64), (1024, 16), (4096, 4)):
  for _kernel in ('dense', 'splash'):
    ARMS[f'b16_L{_length}_v5e4_{_kernel}'] = (
        f'{SIGLIP}:variant=B/16,batch={_rows}', 'v5e:2x2',
        (f'--config.input.tokens_per_row={_length}',
         f'--config.input.images_per_row={16 * _length // 256}',
         f'--config.input.captions_per_row={2.85 * _length / 256}',
         f'--config.model.image.attention={_kernel}',
         '--config.input.text_packing=False'))


def run_arm(name, results_dir):
  path = os.path.join(results_dir, f'{name}.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  config, topology, overrides = ARMS[name]
  start = time.perf_counter()
  done = subprocess.run(
      [sys.executable, '-m', 'lit_navit.plan', '--config', config, '--topology',
       topology, '--json', *overrides], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  if done.returncode not in (0, 1):  # 1: planned, does not fit
    raise RuntimeError(f'{name}: plan failed: {done.stderr[-2000:]}')
  result = json.loads(done.stdout)
  result['wall_s'] = time.perf_counter() - start
  result['command'] = ' '.join(['python -m lit_navit.plan --config', config,
                                '--topology', topology, *overrides])
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  return result


def table(results: dict) -> str:
  head = ('| arm | HBM/chip GiB (headroom) | collectives/chip GiB | step s (overlapped) '
          '| MFU (overlapped) | fusion-roofline MFU (overlapped) | img/s/chip | compile s |')
  lines = [head, '|' + ' --- |' * 8]
  for name, r in results.items():
    if 'compile_error' in r:
      lines.append(f"| {name} | does not fit: {r['compile_error']} | | | | | | |")
      continue
    if 'projected_step_s' not in r:  # planned with --nocost_model
      lines.append(
          f"| {name} | {r['hbm_per_chip_bytes'] / 2**30:.2f} ({100 * r['hbm_headroom']:.0f}%"
          f"{'' if r['fits'] else ', does not fit'}) "
          f"| {r['collective_bytes_per_chip']['total'] / 2**30:.2f} | — | — | — | — "
          f"| {r['compile_s']:.0f} + — |")
      continue
    lines.append(
        f"| {name} | {r['hbm_per_chip_bytes'] / 2**30:.2f} ({100 * r['hbm_headroom']:.0f}%"
        f"{'' if r['fits'] else ', does not fit'}) "
        f"| {r['collective_bytes_per_chip']['total'] / 2**30:.2f} "
        f"| {r['projected_step_s']:.3f} ({r['projected_step_s_overlapped']:.3f}) "
        f"| {100 * r['projected_mfu']:.1f}% ({100 * r['projected_mfu_overlapped']:.1f}%)"
        f"{'' if r['compute_method'] == 'xla' else ' roofline'} "
        "| {:.1f}% ({:.1f}%) ".format(*(100 * m for m in r['projected_mfu_fusion_roofline']))
        + f"| {r['images_per_s_per_chip']:.1f} "
        f"| {r['compile_s']:.0f} + {r['cost_model_compile_s']:.0f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arms', nargs='*', default=list(ARMS), choices=list(ARMS))
  parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                        'plan_tpu'))
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  results = {name: run_arm(name, args.results) for name in args.arms}
  print(table(results))


if __name__ == '__main__':
  main()
