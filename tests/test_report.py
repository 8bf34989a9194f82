"""The trainer's reports (training/report.py): the console line shows every scalar under the name
it was written with, and the speed is timed from the end of the compiling step."""

import logging

import ml_collections
import pytest

from instance_loss_jax.training import report


def test_the_console_line_shows_what_it_is_given(caplog):
  writer = report.ConsoleWriter(total_steps=100)
  with caplog.at_level(logging.INFO, logger="instance_loss_jax.trainer"):
    writer.write_scalars(40, {"train/loss": 1.23456, "train/new_name": 7,
                              "train/seconds_left": 3725.0, "val/rsum": 250.0})
  assert caplog.messages == ["step 40/100 | train: loss 1.235, new_name 7, seconds_left 1h02m"
                             " | val: rsum 250"]


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (187.9, "3m07s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (90061, "25h01m")])
def test_seconds_read_as_a_time(seconds, text):
  assert report.format_seconds(seconds) == text


def test_throughput_counts_from_the_first_step(monkeypatch):
  clock = iter([100.0, 104.0, 106.0])
  monkeypatch.setattr(report.time, "monotonic", lambda: next(clock))
  config = ml_collections.ConfigDict({"batch_size": 8, "compute_dtype": "float32"})
  speed = report.Throughput(config, total_steps=30, step=1, flops_per_step=2e12)
  first = speed(5)  # 4 steps in the 4 s after the compiling step 1
  assert first == pytest.approx({"images_per_second": 8.0, "tflops_per_device": 2.0,
                                 "seconds_left": 25.0})
  assert speed(9)["images_per_second"] == pytest.approx(16.0)  # since the last report only
  assert report.mean([{"loss": 1.0}, {"loss": 2.0}]) == {"loss": 1.5}
