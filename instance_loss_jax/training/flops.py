"""How much of the chip a step uses: XLA's FLOP count of the compiled step, TFLOP/s per device
and model FLOP utilisation (MFU) against the device's peak.

The count is XLA's cost analysis of the executable the step runs (per device: under
jit(shard_map) or SPMD each device runs its own program), so it includes every operation the
step performs, the backward pass and the optimiser included, not a formula for the model.
"""

from __future__ import annotations

from typing import Any

# Dense peak TFLOP/s per chip by device kind (as `jax.Device.device_kind` reports it) and
# compute dtype. float32 is what XLA runs float32 convolutions and matmuls at by default: on a
# TPU one bfloat16 pass (the bfloat16 peak); on NVIDIA GPUs since Ampere, TF32 tensor cores.
# Sources, each the vendor's own page or data sheet (figures with 2:4 sparsity halved):
# - TPU v4: 275 (cloud.google.com/tpu/docs/v4); v5e ("TPU v5 lite"): 197
#   (cloud.google.com/tpu/docs/v5e); v5p: 459 (cloud.google.com/tpu/docs/v5p); v6e ("TPU v6
#   lite", Trillium): 918 (cloud.google.com/tpu/docs/v6e).
# - A100 (SXM and PCIe): bfloat16 312, TF32 156 (NVIDIA A100 Tensor Core GPU data sheet).
# - H100 SXM: bfloat16 989, TF32 494; H100 PCIe: 756 and 378 (NVIDIA H100 Tensor Core GPU data
#   sheet). H200 SXM: 989 and 494 (NVIDIA H200 Tensor Core GPU data sheet).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
}


def peak_tflops(device_kind: str, compute_dtype: str) -> float | None:
  """The device's dense peak for `compute_dtype`, or None where the table has no figure (CPUs;
  NVL and other variants whose peak differs). TPUs match by name; NVIDIA GPUs by model
  ("NVIDIA H100 80GB HBM3" is an H100 SXM)."""
  if device_kind in PEAK_TFLOPS:
    return PEAK_TFLOPS[device_kind].get(compute_dtype)
  if not device_kind.startswith("NVIDIA ") or "NVL" in device_kind:
    return None
  for model in ("H100 PCIe", "H100", "H200", "A100"):
    if model in device_kind:
      return PEAK_TFLOPS[model].get(compute_dtype)
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, per device (None where the backend gives none)."""
  cost: Any = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def utilisation(flops_per_step: float | None, steps_per_second: float, device_kind: str,
                compute_dtype: str) -> dict[str, float]:
  """{"tflops_per_device": ..., "mfu": ...}: what is known (no MFU without a peak)."""
  if not flops_per_step:
    return {}
  out = {"tflops_per_device": flops_per_step * steps_per_second / 1e12}
  peak = peak_tflops(device_kind, compute_dtype)
  if peak:
    out["mfu"] = out["tflops_per_device"] / peak
  return out
