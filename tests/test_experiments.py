"""The experiments' code path end to end at a tiny setting."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import equal_compute  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import flexivit  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import posemb_extrapolation  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import resolution_generalisation  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_posemb_extrapolation_writes_every_arm_and_point(tmp_path):
  arms = ['fractional', 'sincos']
  posemb_extrapolation.main([
      '--out', str(tmp_path),
      '--seeds', '1', '--steps', '2', '--eval_examples', '12',
      '--eval_sides', '64,128,256', '--arms', ','.join(arms)])
  with open(tmp_path / 'posemb_extrapolation.json', encoding='utf-8') as f:
    results = json.load(f)
  assert sorted(results['arms']) == sorted(arms)
  sides = ['64', '128', '256']
  for name in arms:
    arm = results['arms'][name]
    assert arm['posemb'] == posemb_extrapolation.ARMS[name]
    assert sorted(arm['points']) == sorted(sides)
    for side in sides:
      point = arm['points'][side]
      assert 0 <= point['min'] <= point['mean'] <= point['max'] <= 1
      assert len(point['values']) == 1
  assert results['setting']['eval_tokens'] == [16, 64, 256]
  table = posemb_extrapolation.common.markdown_table(results['arms'], sides)
  assert all(name in table for name in arms)
  assert os.path.getsize(tmp_path / 'posemb_extrapolation.png') > 1000


def test_logged_stats_read_back_what_the_run_logged(tmp_path):
  records = [dict(step=2, images=90.0, padding_fraction=0.01, empty_caption_fraction=0.1),
             dict(step=4, images=110.0, padding_fraction=0.03, empty_caption_fraction=0.2),
             dict(step=4, heldout_loss=3.0)]  # an eval record: no batch statistics
  with open(tmp_path / 'metrics.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  stats = common.logged_stats(str(tmp_path))
  assert stats.pop('logged_steps') == [2, 4]
  assert stats == pytest.approx(dict(images_per_step=100.0, images_seen_estimate=400,
                                     padding_fraction=0.02, empty_caption_fraction=0.15))
  assert common.logged_stats(str(tmp_path / 'missing')) == {}


def read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.slow
def test_equal_compute_gives_every_arm_the_same_flops_and_resolution_reads_them(tmp_path):
  """Two arms at a few steps: each arm's steps x step FLOPs meet the
  reference arm's budget within one step, every curve and token point is
  there, and resolution_generalisation reads the same models back from the
  kept --workdir instead of training them again."""
  arms = ['ViT (padded square)', 'NaViT']
  workdir = tmp_path / 'arms'
  common_flags = ['--seeds', '1', '--steps', '4', '--eval_examples', '12',
                  '--arms', ','.join(arms), '--workdir', str(workdir)]
  equal_compute.main(['--out', str(tmp_path), '--eval_sides', '64,128',
                      *common_flags])
  results = read_json(tmp_path / 'equal_compute.json')
  budget = 4 * results['arms']['NaViT']['step_flops']
  for name in arms:
    arm = results['arms'][name]
    assert abs(arm['train_flops'] - budget) <= arm['step_flops'] / 2
    # The curve's points are the saved steps, evenly spaced, the last final.
    every = math.ceil(arm['steps'] / equal_compute.CURVE_POINTS)
    saved = sorted(set(range(every, arm['steps'] + 1, every)) | {arm['steps']})
    curve = equal_compute.curve(arm, 'seen/flops/')
    assert equal_compute.curve(arm, 'heldout/flops/')['x'] == curve['x']
    assert curve['x'] == pytest.approx([s * arm['step_flops'] for s in saved],
                                       rel=1e-3)
    assert {k for k in arm['points'] if '/tokens/' in k} == {
        'seen/tokens/16', 'seen/tokens/64', 'heldout/tokens/16', 'heldout/tokens/64'}
    for point in arm['points'].values():
      assert 0 <= point['min'] <= point['mean'] <= point['max'] <= 1
  vit = results['arms']['ViT (padded square)']
  assert vit['eval_resize'] == 'square' and vit['steps'] > 4  # cheaper steps
  assert (vit['rows'], vit['captions_per_row']) == (2 * results['arms']['NaViT']['rows'], None)
  for name in arms:
    seed = results['arms'][name]['seeds'][0]
    assert seed['train_seconds'] > 0 and seed['images_seen_estimate'] > 0
    assert 0 <= seed['padding_fraction'] < 1 and 0 <= seed['empty_caption_fraction'] < 1
  assert os.path.getsize(tmp_path / 'equal_compute.png') > 1000
  for png in ('equal_compute_tokens.png', 'equal_compute_heldout.png'):
    assert os.path.getsize(tmp_path / png) > 1000

  resolution_generalisation.main(['--out', str(tmp_path), '--eval_sides',
                                  '32,256', *common_flags])
  results = read_json(tmp_path / 'resolution_generalisation.json')
  for name in arms:
    seed = results['arms'][name]['seeds'][0]
    assert seed['reused'] == str(workdir / name / 'seed0')
    assert sorted(results['arms'][name]['points']) == [
        'heldout/256', 'heldout/32', 'seen/256', 'seen/32']
  assert os.path.getsize(tmp_path / 'resolution_generalisation.png') > 1000
  assert os.path.getsize(tmp_path / 'resolution_generalisation_heldout.png') > 1000


@pytest.mark.slow
def test_flexivit_evaluates_every_arm_at_every_patch_size(tmp_path):
  arms = ['FlexiViT (8-24)', 'ViT-24']
  flexivit.main(['--out', str(tmp_path), '--seeds', '1', '--steps', '2',
                 '--eval_examples', '12', '--arms', ','.join(arms)])
  results = read_json(tmp_path / 'flexivit.json')
  assert results['setting']['eval_tokens'] == [144, 64, 36, 16]
  for name in arms:
    arm = results['arms'][name]
    assert arm['patch_sizes'] == list(flexivit.ARMS[name])
    assert set(arm['points']) == {f'{metric}/{p}' for metric in ('seen', 'heldout')
                                  for p in (8, 12, 16, 24)}
  assert os.path.getsize(tmp_path / 'flexivit.png') > 1000
  assert os.path.getsize(tmp_path / 'flexivit_heldout.png') > 1000


def test_colour_map_labels_the_patches_the_object_covers():
  from experiments import siglip2_losses  # pylint: disable=g-import-not-at-top
  from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
  # A red circle of radius 12 at (8, 8) covers all of the top-left 16 px
  # patch and under half of any other; in a 128 x 64 image stretched to
  # 64 x 64, a circle at (16, 8) covers most of the same patch.
  red = 1 + synthetic.COLOURS.index('red')
  expected = np.zeros((4, 4), int)
  expected[0, 0] = red
  for width, cx in ((64, 8.0), (128, 16.0)):
    attributes = dict(shape='circle', colour='red', width=width, height=64,
                      centre=(cx, 8.0), radius=12.0, tilt=0.0, rgb=(255, 0, 0))
    labels = siglip2_losses.colour_map(attributes, 4, 64)
    np.testing.assert_array_equal(labels, expected)


def test_the_dense_probe_reads_a_linear_code_and_not_noise(monkeypatch):
  from experiments import siglip2_losses  # pylint: disable=g-import-not-at-top
  config = common.tiny_config(steps=1, seed=0)
  grid = siglip2_losses.PROBE_SIDE // config.input.patch_sizes[0]
  source = common.eval_sources(config, 48)['seen']
  labels = np.stack([siglip2_losses.colour_map(source.attributes(i), grid,
                                               siglip2_losses.PROBE_SIDE)
                     for i in range(len(source))]).reshape(len(source), -1)
  rng = np.random.default_rng(0)
  coded = np.eye(16)[labels] + 0.1 * rng.standard_normal((*labels.shape, 16))
  noise = rng.standard_normal((*labels.shape, 16))
  for features, good in ((coded, True), (noise, False)):
    monkeypatch.setattr(siglip2_losses, 'patch_tokens',
                        lambda *args, features=features: features)
    probe = siglip2_losses.dense_probe(config, None, len(source))
    if good:  # the few misses: a colour none of its fit images shows a patch of
      assert probe['object'] > 0.9 and probe['all'] > 0.99
    else:
      assert probe['object'] < 0.5


@pytest.mark.slow
def test_siglip2_losses_gives_every_arm_the_same_budget(tmp_path):
  from experiments import siglip2_losses  # pylint: disable=g-import-not-at-top
  arms = ['sigmoid', '+masked']
  siglip2_losses.main(['--out', str(tmp_path), '--seeds', '1', '--steps', '2',
                       '--eval_examples', '12', '--arms', ','.join(arms)])
  results = read_json(tmp_path / 'siglip2_losses.json')
  budget = results['setting']['budget_flops']
  for name in arms:
    arm = results['arms'][name]
    per_step = arm['run_flops'] / arm['steps']
    assert abs(arm['run_flops'] - budget) <= per_step / 2
    assert sorted(arm['points']) == sorted(siglip2_losses.POINTS)
  # The costlier arm trains fewer steps on the same budget.
  assert results['arms']['sigmoid']['steps'] > results['arms']['+masked']['steps']
