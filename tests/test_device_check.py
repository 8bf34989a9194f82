"""benchmarks/device_check.sh on CPU with the tests' tiny model (its --dry_run): every part in
its order, one JSON line each as soon as measured, the compiles through the persistent cache;
and the later parts skipped, saying so, when the time budget cannot cover them."""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import pytest

from helpers import load_benchmark, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_part_the_time_left_cannot_cover_is_skipped_with_its_reason(tmp_path, capsys):
  check = load_benchmark("device_check").Check(argparse.Namespace(budget_s=100.0,
                                                                  out=str(tmp_path)))
  assert check.affordable("first", 1, 10)  # before part 1 nothing is known: everything is tried
  check.compile_s, check.step_s = 30.0, 0.5
  assert check.affordable("cheap", 2, 10)  # 2 x 30 s + 10 steps x 0.5 s x 3 < 100 s
  check.deadline = time.monotonic() + 40.0
  assert not check.affordable("dear", 1, 10)  # 30 + 15 > 40
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert lines == [{"part": "dear", "skipped": "needs about 45 s, 40 s left"}]
  with open(tmp_path / "device_check.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == lines


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", OUT=str(tmp_path),
             CACHE=str(cache), BUDGET_S="600", WHEELS=str(tmp_path / "no_wheels"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=xla_flags(1))  # one CPU device; the tests' faster-compiling emitters
  proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry_run"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  with open(tmp_path / "device_check.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == lines  # the file has each line as printed
  assert [r["part"] for r in lines] == [
      "start", "stage2_bf16", "stage2_bf16_larger", "stage2_bf16_larger", "stage1_prefetch",
      "stage2_float32", "w_share_64", "end"]
  assert lines[0]["cache"] == str(cache) and lines[0]["dry_run"]
  rows = {r["part"]: r for r in lines[1:-1] if "step_s" in r}
  assert sorted(rows) == ["stage2_bf16", "stage2_bf16_larger", "stage2_float32", "w_share_64"]
  for row in rows.values():
    assert row["step_s"] > 0 and row["compile_s"] > 0 and row["tflop_per_s"] > 0
    assert math.isfinite(row["loss"]) and "note" not in row
  # The larger batch: predicted from part 1's memory account to fit, then compiled and run.
  assert lines[2]["predicted_fit"] == [8] and rows["stage2_bf16_larger"]["batch"] == 8
  assert rows["w_share_64"]["classes"] == 64 and rows["stage2_float32"]["dtype"] == "float32"
  assert lines[4]["prefetch_0_ms"] > 0 and lines[4]["prefetch_2_ms"] > 0
  assert any(cache.iterdir())  # the compiles were written to the persistent cache
  assert "| jax/xla | 2 | bfloat16 | 64 | 4 |" in proc.stdout  # the closing table
