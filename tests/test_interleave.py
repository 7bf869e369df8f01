"""benchmarks/interleave.py: balanced orders and persistent worker processes."""

import collections
import itertools
import os
import sys
import textwrap

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks')
sys.path.insert(0, BENCHMARKS)
import interleave  # pylint: disable=wrong-import-position


@pytest.mark.parametrize('count', [1, 2, 3, 4, 5, 6])
def test_williams_orders_balance_who_follows_whom(count):
  orders = interleave.williams_orders(count)
  assert all(sorted(order) == list(range(count)) for order in orders)
  follows = collections.Counter(pair for order in orders
                                for pair in zip(order, order[1:]))
  pairs = list(itertools.permutations(range(count), 2))
  assert set(follows) == set(pairs)
  assert len(set(follows[p] for p in pairs)) <= 1  # Each pair equally often.
  firsts = collections.Counter(order[0] for order in orders)
  assert len(set(firsts.values())) == 1 and len(firsts) == count


def write_worker(tmp_path, name: str, body: str) -> list:
  """argv of a worker script whose setup() is `body`."""
  script = tmp_path / f'{name}.py'
  script.write_text(f'import sys, time\nsys.path.insert(0, {BENCHMARKS!r})\n'
                    'import interleave\n\ndef setup():\n'
                    + textwrap.indent(textwrap.dedent(body), '  ')
                    + '\ninterleave.serve(setup)\n')
  return [sys.executable, str(script)]


def test_workers_time_steps_round_by_round(tmp_path, capfd):
  fast = write_worker(tmp_path, 'fast', '''
      print('a library talking on stdout')
      def step():
        print('and again, each step')
        time.sleep(0.05)
      return step, {'seconds': 0.05}
  ''')
  slow = write_worker(tmp_path, 'slow', '''
      return (lambda: time.sleep(0.15)), {'seconds': 0.15}
  ''')
  workers = [interleave.Worker('fast', fast), interleave.Worker('slow', slow)]
  try:
    assert [w.info for w in workers] == [{'seconds': 0.05}, {'seconds': 0.15}]
    rounds = interleave.run_rounds(workers, 3, {'fast': 3, 'slow': 2})
  finally:
    for worker in workers:
      worker.close()
  assert [w.process.returncode for w in workers] == [0, 0]
  assert [r['order'] for r in rounds] == [['fast', 'slow'], ['slow', 'fast'],
                                          ['fast', 'slow']]
  assert [r['fast'].shape for r in rounds] == [(3, 3)] * 3
  assert [r['slow'].shape for r in rounds] == [(2, 3)] * 3
  assert all((r['fast'][:, 0] >= 0.05).all() and (r['slow'][:, 0] >= 0.15).all()
             for r in rounds)
  ratio = interleave.ratio_spread(rounds, 'slow', 'fast')
  assert ratio['n'] == 3 and ratio['min'] <= ratio['median'] <= ratio['max']
  assert 2.0 < ratio['median'] < 3.5
  assert 'a library talking on stdout' in capfd.readouterr().err


def test_a_worker_that_fails_to_set_up_is_named(tmp_path):
  broken = write_worker(tmp_path, 'broken', '''
      raise ValueError('no such model')
  ''')
  with pytest.raises(RuntimeError, match="worker 'broken' failed: ValueError: no such model"):
    interleave.Worker('broken', broken)


def test_spread_of_known_values():
  s = interleave.spread([4.0, 1.0, 3.0, 2.0, 5.0])
  assert s == {'median': 3.0, 'min': 1.0, 'max': 5.0, 'q1': 2.0, 'q3': 4.0, 'n': 5}
