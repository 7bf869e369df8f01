"""Checkpoint steps are numbers: step 12 is newer than step 4, 10 than 9."""

import os

from lit_navit import checkpoint


def test_newest_readable_tries_the_numerically_newest_step_first():
  tried = []

  def restore(step):
    tried.append(step)
    return f'state {step}'

  step, state, failed = checkpoint.newest_readable([4, 8, 12], restore, 'here')
  assert (step, state, failed, tried) == (12, 'state 12', [], [12])


def test_newest_readable_falls_back_in_numeric_order():
  tried = []

  def restore(step):
    tried.append(step)
    if step > 4:
      raise ValueError(f'step {step} is damaged')
    return step

  step, _, failed = checkpoint.newest_readable([12, 4, 8], restore, 'here')
  assert step == 4 and tried == [12, 8, 4]
  assert [s for s, _ in failed] == [12, 8]


def test_load_for_inference_picks_step_10_over_step_9(tmp_path, monkeypatch):
  for step in ('9', '10'):
    os.makedirs(tmp_path / checkpoint.CHECKPOINT_DIR / step)
  # Reading a step is tested elsewhere; here only which step is read.
  monkeypatch.setattr(checkpoint, '_read_step', os.path.basename)
  assert checkpoint.load_for_inference(str(tmp_path)) == '10'
