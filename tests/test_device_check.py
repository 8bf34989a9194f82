"""benchmarks/device_check.sh on CPU with the tests' tiny model (its --dry_run): every part in
its order, one JSON line each as soon as measured, the compiles through the persistent cache,
and the later parts skipped (saying so) when the time budget is spent."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_PARTS = ["stage2_bf16", "stage2_bf16_larger", "stage2_float32", "w_share_100",
              "w_share_1000"]


def run_check(out, cache, budget_s):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", OUT=str(out),
             CACHE=str(cache), BUDGET_S=str(budget_s), WHEELS=str(out / "no_wheels"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="")  # one CPU device
  proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry_run"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  with open(out / "device_check.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == lines  # the file has each line as printed
  return lines


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
  cache = tmp_path / "cache"
  lines = run_check(tmp_path / "first", cache, 600)
  assert [r["part"] for r in lines] == [
      "start", "stage2_bf16", "stage2_bf16_larger", "stage2_bf16_larger", "stage1_prefetch",
      "stage2_float32", "w_share_100", "w_share_1000", "end"]
  assert lines[0]["cache"] == str(cache) and lines[0]["dry_run"]
  rows = {r["part"]: r for r in lines[1:-1] if "step_s" in r}
  assert sorted(rows) == sorted(STEP_PARTS)
  for row in rows.values():
    assert row["step_s"] > 0 and row["compile_s"] > 0 and row["tflop_per_s"] > 0
    assert math.isfinite(row["loss"]) and "note" not in row
  # The larger batch: predicted from part 1's memory account, the largest candidate that fits.
  predicted = lines[2]
  assert predicted["predicted_fit"] == [8, 16] and rows["stage2_bf16_larger"]["batch"] == 16
  assert rows["w_share_1000"]["classes"] == 1000 and rows["stage2_float32"]["dtype"] == "float32"
  prefetch = lines[4]
  assert prefetch["prefetch_0_ms"] > 0 and prefetch["prefetch_2_ms"] > 0
  assert any(cache.iterdir())  # the compiles were written to the persistent cache
  # No time left after part 1: every later part says it was skipped and why.
  lines = run_check(tmp_path / "second", cache, 0.001)
  assert [r["part"] for r in lines][:2] == ["start", "stage2_bf16"] and "step_s" in lines[1]
  skipped = [r for r in lines[2:-1]]
  assert [r["part"] for r in skipped] == ["stage2_bf16_larger", "stage2_bf16_larger",
                                          "stage1_prefetch", "stage2_float32", "w_share_100",
                                          "w_share_1000"]
  assert "predicted_fit" in skipped[0]
  assert all("s left" in r["skipped"] for r in skipped[1:])
