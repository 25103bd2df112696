"""Planning rules: pure functions of numbers that the passes decide with, that BN
calibration recomputes and that training will call, so that each rule exists once.

* ``input_scale``: the step of a layer's quantized inputs from their observed range;
* ``adc_params``: the step Delta and integer zero point z of each ADC column from its
  partial-sum range;
* ``output_affine``: the per-column scale and bias that turn the integer accumulator
  into the layer's output.
"""
from __future__ import annotations

import numpy as np


def input_scale(lo: float, hi: float, bits: int) -> tuple[float, bool]:
    """(scale, signed) of ``bits``-bit inputs observed in [lo, hi]: unsigned when they never
    go negative, q in [0, 2^b-1], s = hi/(2^b-1); else signed two's complement,
    q in [-2^(b-1), 2^(b-1)-1], s = max|x|/(2^(b-1)-1) (max|x| at 1 bit).  A degenerate
    range gives s = 1.  The scale is rounded to float32 (as the IR stores it)."""
    signed = lo < 0
    if signed:
        scale = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1) if bits > 1 else max(abs(lo), abs(hi))
    else:
        scale = hi / (2 ** bits - 1)
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return float(np.float32(scale)), bool(signed)


def adc_params(s_min: np.ndarray, s_max: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column: Delta = max(1, (s_max - s_min)/(2^b - 1)) and z = round(-s_min/Delta), float32.
    Delta >= 1 keeps a column whose range fits in 2^b levels lossless."""
    span = np.maximum(s_max - s_min, 0)
    delta = np.maximum(1.0, span / (2 ** bits - 1)).astype(np.float32)
    z = np.round(-s_min / delta).astype(np.float32)
    return delta, z


def output_affine(input_scale: float, weight_scales, scale, bias, shift) -> tuple[np.ndarray, np.ndarray | None]:
    """(out_scale, out_bias) per output channel, float32: out_scale = float32(s_x) * s_w * scale
    and out_bias = bias * scale + shift, where (scale, shift) is the BatchNorm kept after the
    arrays (scale 1 and no shift without one); out_bias is None when there is neither bias
    nor shift."""
    scale = np.asarray(scale, np.float32)
    out_scale = (np.float32(input_scale) * np.asarray(weight_scales, np.float32) * scale).astype(np.float32)
    if shift is None:
        return out_scale, None if bias is None else np.asarray(bias, np.float32)
    b = np.zeros(scale.shape, np.float32) if bias is None else np.asarray(bias, np.float32)
    return out_scale, (b * scale + np.asarray(shift, np.float32)).astype(np.float32)
