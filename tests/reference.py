"""An independent numpy reference of the PIM math, for tests only.

Written apart from the passes (it shares no code with pimc): direct im2col,
integer bit manipulation for slices and planes, explicit loops over tiles,
slices, planes and columns.  Only the *definitions* are shared with the
compiler, as stated in docs/IR.md:

* inputs: unsigned b-bit when the calibration data never goes negative
  (s_x = max/(2^b-1)), else signed two's complement (s_x = max|x|/(2^(b-1)-1));
* weights: symmetric per output column, s_w = max|W[o]|/(2^(b-1)-1);
* ADC (full range): per column, [s_min, s_max] = worst case over the input
  slice range; Delta = max(1, (s_max-s_min)/(2^b-1)); z = round(-s_min/Delta);
  Q(s) = (clip(round(s/Delta) + z, 0, 2^b-1) - z) * Delta.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def quant_input(x, calib, bits):
    lo, hi = float(calib.min()), float(calib.max())
    if lo < 0:
        s = F32(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1)) if bits > 1 else F32(max(abs(lo), abs(hi)))
        qlo, qhi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        signed = True
    else:
        s = F32(hi / (2 ** bits - 1))
        qlo, qhi = 0, 2 ** bits - 1
        signed = False
    if not (s > 0):
        s = F32(1)
    q = np.clip(np.round(x.astype(F32) / s), qlo, qhi).astype(np.int64)
    return q, s, signed


def quant_weight(w, bits):
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(1).astype(F32)
    s = np.where(amax > 0, amax / F32(qmax), F32(1)).astype(F32)
    q = np.clip(np.round(flat / s[:, None]), -qmax, qmax).astype(np.int64)
    return q, s   # q: (Cout, K) rows ordered (c, kh, kw)


def im2col(x, kh, kw, stride, pad, dil):
    """x (B, C, H, W) int64 -> patches (B, OH*OW, C*kh*kw) ordered (c, i, j)."""
    B, C, H, W = x.shape
    xp = np.zeros((B, C, H + pad[0] + pad[2], W + pad[1] + pad[3]), x.dtype)
    xp[:, :, pad[0]:pad[0] + H, pad[1]:pad[1] + W] = x
    OH = (H + pad[0] + pad[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    OW = (W + pad[1] + pad[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    cols = np.zeros((B, OH, OW, C, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dil[0], j * dil[1]
            cols[:, :, :, :, i, j] = xp[:, :, hs:hs + stride[0] * OH:stride[0], ws:ws + stride[1] * OW:stride[1]].transpose(0, 2, 3, 1)
    return cols.reshape(B, OH * OW, C * kh * kw), OH, OW


def weight_cells(q, bits, cell, differential):
    """List of (coef, cells) with q == sum coef * cells, via integer bit ops."""
    out = []
    if differential:
        mag = bits - 1
        c = cell or mag
        for sign, part in ((1, np.maximum(q, 0)), (-1, np.maximum(-q, 0))):
            for j in range(math.ceil(mag / c)):
                out.append((sign * (1 << (c * j)), (part >> (c * j)) & ((1 << c) - 1)))
    else:
        c = cell or bits
        n = math.ceil(bits / c)
        u = q & ((1 << bits) - 1)          # two's complement pattern
        for j in range(n):
            d = (u >> (c * j)) & ((1 << c) - 1)
            if j == n - 1:                   # top cell: sign-extend its (bits - c*j) bits
                tb = bits - c * j
                d = (u >> (c * j)) & ((1 << tb) - 1)
                d = np.where(d >= (1 << (tb - 1)), d - (1 << tb), d)
            out.append((1 << (c * j), d))
    return out


def input_planes(q, bits, signed, bit_serial):
    """List of (coef, plane, (lo, hi))."""
    if not bit_serial:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        return [(1, q, (lo, hi))]
    u = q & ((1 << bits) - 1)
    out = []
    for p in range(bits):
        coef = -(1 << p) if (signed and p == bits - 1) else (1 << p)
        out.append((coef, (u >> p) & 1, (0, 1)))
    return out


def tile_rows(cin_g, kh, kw, rows, mode):
    k = kh * kw
    K = cin_g * k
    if mode == "channel":
        cpa = rows // k
        return [np.arange(t * cpa * k, min((t + 1) * cpa, cin_g) * k) for t in range(math.ceil(cin_g / cpa))]
    return [np.arange(t * rows, min((t + 1) * rows, K)) for t in range(math.ceil(K / rows))]


def adc(s, lo, hi, bits):
    delta = F32(max(1.0, (hi - lo) / (2 ** bits - 1)))
    z = F32(np.round(-lo / float(delta)))
    code = np.clip(np.round(s.astype(F32) / delta) + z, 0, 2 ** bits - 1)
    return ((code - z) * delta).astype(np.float64)


def pim_conv(x, w, b, calib, *, stride=(1, 1), pad=(0, 0, 0, 0), dil=(1, 1), group=1, scheme="differential",
             weight_bits=8, input_bits=8, cell_bits=0, array_rows=128, tile_mode="channel", adc_bits=8, adc_on=True,
             adc_range="full"):
    """Reference output of one Conv layer mapped by the given configuration.  ``adc_range``:
    "full" (worst case over the input range) or "calibrated" (min/max of each column's
    partial sums over all input planes of the calibration data, widened to include 0)."""
    cout, cin_g, kh, kw = w.shape
    cout_g = cout // group
    qx, sx, signed = quant_input(x, calib, input_bits)
    qw, sw = quant_weight(w, weight_bits)
    cols, OH, OW = im2col(qx, kh, kw, stride, pad, dil)
    qc = np.clip(np.round(calib.astype(F32) / sx), *((-(2 ** (input_bits - 1)), 2 ** (input_bits - 1) - 1) if signed
                                                       else (0, 2 ** input_bits - 1))).astype(np.int64)
    ccols, _, _ = im2col(qc, kh, kw, stride, pad, dil)
    B = x.shape[0]
    acc = np.zeros((B, OH * OW, cout), np.float64)
    bit_serial = scheme.startswith("bit-serial")
    differential = scheme.endswith("differential")
    tiles = tile_rows(cin_g, kh, kw, array_rows, tile_mode)
    K = cin_g * kh * kw
    for g in range(group):
        xg = cols[:, :, g * K:(g + 1) * K]
        cg = ccols[:, :, g * K:(g + 1) * K]
        for o in range(g * cout_g, (g + 1) * cout_g):
            for wc, cells in weight_cells(qw[o], weight_bits, cell_bits, differential):
                for rows in tiles:
                    wt = cells[rows]
                    if adc_range == "calibrated":
                        sc = [plane @ wt for _, plane, _ in input_planes(cg[:, :, rows], input_bits, signed, bit_serial)]
                        smin = min(0.0, min(float(v.min()) for v in sc))
                        smax = max(0.0, max(float(v.max()) for v in sc))
                    for pc, plane, (lo, hi) in input_planes(xg[:, :, rows], input_bits, signed, bit_serial):
                        s = plane @ wt
                        if adc_on:
                            if adc_range == "full":
                                smax = float(np.sum(np.maximum(wt * lo, wt * hi)))
                                smin = float(np.sum(np.minimum(wt * lo, wt * hi)))
                            s = adc(s, smin, smax, adc_bits)
                        acc[:, :, o] += pc * wc * s
    y = acc * float(sx) * sw.astype(np.float64)[None, None, :]
    if b is not None:
        y = y + b[None, None, :]
    return y.reshape(B, OH, OW, cout).transpose(0, 3, 1, 2)
