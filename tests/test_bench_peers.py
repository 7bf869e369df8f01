"""bench_train --peers' summary: within-round ratios and shares of the ceiling."""

import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                'benchmarks'))
import bench_train  # pylint: disable=wrong-import-position


def worker(name, framework, flops=None):
  return types.SimpleNamespace(name=name, info={'framework': framework, 'flops': flops,
                                                'params': 1})


def samples(*seconds):
  """[steps, 3] usage differences: wall, CPU seconds (2 cores busy), faults."""
  return np.array([[s, 2 * s, 100] for s in seconds])


def test_ratios_are_taken_within_rounds():
  workers = [worker('ours', 'lit_navit', flops=1e12), worker('open_clip', 'open_clip'),
             worker('ceiling', 'jax matmul', flops=2e11)]
  # Round 2 ran under a load that doubled every arm's time: ratios stay put.
  rounds = [{'order': ['ours', 'open_clip', 'ceiling'], 'ours': samples(4.0, 4.0),
             'open_clip': samples(5.0, 5.0), 'ceiling': samples(0.5)},
            {'order': ['open_clip', 'ceiling', 'ours'], 'ours': samples(8.0, 8.0),
             'open_clip': samples(10.0, 10.0), 'ceiling': samples(1.0)}]
  summary = bench_train.peers_summary('w1', workers, rounds, steps=2)
  ratio = summary['ratios']['ours / open_clip']
  assert ratio['median'] == pytest.approx(0.8) and ratio['min'] == pytest.approx(0.8)
  assert ratio['max'] == pytest.approx(0.8) and ratio['n'] == 2
  ours = summary['arms']['ours']
  assert ours['step_seconds']['min'] == 4.0 and ours['step_seconds']['max'] == 8.0
  # 1e12 FLOP in 4 s against 2e11 in 0.5 s: 250 / 400 GFLOP/s in both rounds.
  assert ours['of_ceiling']['median'] == pytest.approx(0.625)
  assert summary['ceiling_gflops']['max'] == pytest.approx(400.0)
  assert ours['images_per_s']['max'] == pytest.approx(8 / 4.0)
  assert summary['arms']['open_clip']['gflops_per_s']['median'] == pytest.approx(
      np.median([1e12 / 5.0 / 1e9, 1e12 / 10.0 / 1e9]))


def test_our_env_splits_into_environment_and_config_overrides():
  our_env = [{}, {'GLIBC_TUNABLES': 'x=1', 'config.cpu_compiler_options': ''}]
  arms = bench_train.our_arms([False], our_env, 'w1')
  assert [env for _, _, env in arms] == [{}, {'GLIBC_TUNABLES': 'x=1'}]
  plain, tuned = (argv for _, argv, _ in arms)
  assert not any(a.startswith('--override') for a in plain)
  assert tuned[-1] == '--override=cpu_compiler_options='
  # The worker applies it to the config it builds.
  config = bench_train.peer_config('B/16', 'B')
  bench_train.config_lib.apply_overrides(config, [tuned[-1].split('=', 2)[1:]])
  assert config.cpu_compiler_options == ''
