"""Redraws every study's figures from its results JSON, without training.

  python experiments/replot.py                    # experiments/results
  python experiments/replot.py --out DIR          # another results folder
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import equal_compute  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import flexivit  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import posemb_extrapolation  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import resolution_generalisation  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=RESULTS, help='folder of the results JSON')
  out = parser.parse_args(argv).out
  for study in (equal_compute, resolution_generalisation, flexivit):
    path = os.path.join(out, f'{study.NAME}.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        study.plot(json.load(f), out)
      print(f'redrew {study.NAME} from {path}')
  path = os.path.join(out, f'{posemb_extrapolation.NAME}.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      posemb_extrapolation.plot(json.load(f), os.path.join(out, f'{posemb_extrapolation.NAME}.png'))
    print(f'redrew {posemb_extrapolation.NAME} from {path}')


if __name__ == '__main__':
  main()
