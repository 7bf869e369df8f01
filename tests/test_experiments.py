"""The experiments' code path end to end at a tiny setting."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from experiments import posemb_extrapolation  # pylint: disable=g-import-not-at-top,wrong-import-position


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
