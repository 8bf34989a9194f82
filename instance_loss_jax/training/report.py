"""What a run reports, through clu's metric writers (the flax examples' convention): scalars and
images to TensorBoard, and one console line per report with the names the step returned.

Why a console writer of our own beside clu's SummaryWriter: clu's LoggingWriter (and
ReportProgress's notes) log through absl at INFO, which the binaries keep off the console
because Orbax reports every save through that same logger (cli/runner.configure_logging).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

from instance_loss_jax.training import flops

log = logging.getLogger("instance_loss_jax.trainer")


def format_seconds(seconds: float) -> str:
  """1h02m above an hour, else 3m07s."""
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


class ConsoleWriter(metric_writers.MetricWriter):
  """One log line per `write_scalars`, `step N/T | train: loss 1.234, ...`: every scalar under
  the name it was written with (a metric the step adds or renames shows as it is), grouped by
  its prefix. `seconds_left` reads as a time. Images, texts and the rest go to TensorBoard
  only."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    groups: dict[str, list[str]] = {}
    for key, value in scalars.items():
      prefix, _, name = key.rpartition("/")
      text = (format_seconds(value) if name == "seconds_left" else f"{float(value):.4g}")
      groups.setdefault(prefix, []).append(f"{name} {text}")
    log.info("step %d/%d | %s", step, self.total_steps, " | ".join(
        f"{prefix}: {', '.join(parts)}" if prefix else ", ".join(parts)
        for prefix, parts in groups.items()))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(logdir: str, total_steps: int) -> metric_writers.MetricWriter:
  """Console and TensorBoard (`logdir`) on process 0; nothing on the others (they compute the
  same figures)."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([ConsoleWriter(total_steps),
                                     metric_writers.SummaryWriter(logdir)])


class Throughput:
  """Images per second since the previous report, XLA's TFLOP/s per device, MFU where the chip's
  peak is known (training/flops.py), and the time left at that rate.

  Started after the first step, whose call compiled the step: neither the speed nor the time
  left counts the compile.
  """

  def __init__(self, config, total_steps: int, step: int, flops_per_step: float | None):
    self.batch_size, self.total_steps = config.batch_size, total_steps
    self.compute_dtype = config.compute_dtype
    self.device_kind = jax.devices()[0].device_kind
    self.flops_per_step = flops_per_step  # per device
    self.last_step, self.last_time = step, time.monotonic()

  def __call__(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    steps_per_second = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    if steps_per_second <= 0:  # the report right after the first step: no interval yet
      return {}
    return {"images_per_second": steps_per_second * self.batch_size,
            **flops.utilisation(self.flops_per_step, steps_per_second, self.device_kind,
                                self.compute_dtype),
            "seconds_left": (self.total_steps - step) / steps_per_second}


def mean(history: list[dict[str, Any]]) -> dict[str, float]:
  """Each metric's mean over the steps since the last report (host values)."""
  return {k: float(np.mean([m[k] for m in history])) for k in history[-1]}
