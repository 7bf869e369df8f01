"""Prefetching changes when batches are made, never which batches or the state."""

import numpy as np
import pytest

from lit_navit.data import prefetch


class Counter:
  """A stateful iterator whose batches are a function of its position."""

  skipped = None

  def __init__(self, stop=None):
    self.position = 0
    self.stop = stop

  def __next__(self):
    if self.stop is not None and self.position >= self.stop:
      raise StopIteration
    self.position += 1
    return {'x': np.full(3, self.position)}

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']


def _take(it, n):
  return [next(it)['x'][0] for _ in range(n)]


@pytest.mark.parametrize('depth', [1, 2, 5])
def test_state_describes_consumed_batches_not_prefetched_ones(depth):
  it = prefetch.Prefetch(Counter(), depth=depth)
  assert _take(it, 4) == [1, 2, 3, 4]
  state = it.get_state()
  assert state == {'position': 4}
  following = _take(it, 3)
  restored = prefetch.Prefetch(Counter(), depth=depth)
  restored.set_state(state)
  assert _take(restored, 3) == following == [5, 6, 7]
  it.close()
  restored.close()


def test_end_of_input_and_errors_reach_the_consumer():
  it = prefetch.Prefetch(Counter(stop=2))
  assert _take(it, 2) == [1, 2]
  for _ in range(2):  # stays exhausted
    with pytest.raises(StopIteration):
      next(it)

  class Broken(Counter):
    def __next__(self):
      raise ValueError('broken source')

  with pytest.raises(ValueError, match='broken source'):
    next(prefetch.Prefetch(Broken()))
