"""The CPU demo: train configs/demo.py on the synthetic source, evaluate, export.

  python -m lit_navit.demo --workdir workdirs/demo

Rerunning resumes training from the newest checkpoint. Evaluation reads the
final checkpoint through the same functions the eval/ scripts use: zero-shot
classification over every shape-colour class on images whose combinations no
training caption named, and image<->text recall@1 on held-out pairs. Then it
exports embeddings of the held-out images and queries them by text. Results
go to WORKDIR/summary.json.
"""

import argparse
import json
import os
import time

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'demo.py')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config', default=DEMO_CONFIG,
                      help='config file[:args] (default: configs/demo.py)')
  parser.add_argument('--eval_examples', type=int, default=512,
                      help='held-out images for zero-shot and retrieval')
  return parser.parse_args(argv)


def run_demo(config_spec: str, workdir: str, eval_examples: int) -> dict:
  """Trains, evaluates and exports; returns the summary written to summary.json."""
  from lit_navit import checkpoint  # pylint: disable=g-import-not-at-top
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  from lit_navit import fs  # pylint: disable=g-import-not-at-top
  from lit_navit import train  # pylint: disable=g-import-not-at-top
  from lit_navit.evaluate import demo_eval  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(config_spec)
  start = time.perf_counter()
  result = train.train(config, workdir)
  train_seconds = time.perf_counter() - start

  trained_config, params = checkpoint.load_for_inference(workdir)
  report = demo_eval.evaluate_and_export(trained_config, params, workdir,
                                         num_examples=eval_examples)
  summary = {
      'steps': int(trained_config.total_steps),
      'steps_this_run': result.steps,
      'seconds': round(time.perf_counter() - start, 1),
      'train_seconds_this_run': round(train_seconds, 1),
      'final_loss': result.final_metrics.get('loss'),
      **report,
  }
  with fs.atomic_write(fs.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print_summary(summary)
  return summary


def print_summary(summary: dict) -> None:
  rows = [
      ('steps', summary['steps']),
      ('seconds (this run)', summary['seconds']),
      ('zero-shot top-1 (held-out combos)', f"{summary['zero_shot_top1']:.3f}"),
      ('zero-shot chance', f"{summary['zero_shot_chance']:.3f}"),
      ('top-1 / chance', f"{summary['zero_shot_top1'] / summary['zero_shot_chance']:.1f}x"),
      ('image->text R@1', f"{summary['image_to_text_r1']:.3f}"),
      ('text->image R@1', f"{summary['text_to_image_r1']:.3f}"),
  ]
  width = max(len(k) for k, _ in rows)
  print('\nlit_navit CPU demo')
  for key, value in rows:
    print(f'  {key:<{width}}  {value}')
  if summary.get('query'):
    q = summary['query']
    print(f"  query {q['text']!r} -> top images: {', '.join(q['top_keys'])}")


def main(argv=None):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  args = parse_args(argv)
  run_demo(args.config, args.workdir, args.eval_examples)


if __name__ == '__main__':
  main()
