"""The throughput line: rates over the steps since the last report."""

import pytest

from lit_navit import metrics


def test_a_step_cut_short_by_a_signal_reports_no_inflated_rate(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: clock[0])
  throughput = metrics.Throughput(total_steps=100, peak_flops_per_s=1e9)
  for step in range(1, 4):  # steady: 1 s a step, 10 images, 1e8 FLOPs
    clock[0] += 1.0
    throughput.add(10, 100, 1e8)
    steady = throughput.report(step)
  assert steady['images_per_s'] == pytest.approx(10) and steady['mfu'] == pytest.approx(0.1)
  # After SIGTERM the last step is flushed as soon as the device is done
  # with it: 0.1 s after the report before, not a real step's time.
  clock[0] += 0.1
  throughput.add(10, 100, 1e8)
  last = throughput.report(4, cut_short=True)
  assert last['images_per_s'] == pytest.approx(10) and last['mfu'] == pytest.approx(0.1)
  # A step that really was slow still shows.
  clock[0] += 3.0
  throughput.add(10, 100, 1e8)
  assert throughput.report(5, cut_short=True)['images_per_s'] == pytest.approx(10 / 3)
