"""The PIM math, written once: every function runs on numpy arrays and on torch tensors
and gives the same values bit for bit.

These are the reference formulas of the IR ops (docs/IR.md): the ONNX function bodies
and the C++ kernels in ``pimc.runtime`` are tested against them, layer statistics and
training call them.  Array-library independence comes from ``array_api_compat``
(one small, well-kept dependency that maps numpy and torch onto the Array API
standard) rather than duck typing, which breaks on the many calls where numpy and
torch differ (``astype``/``to``, ``clip``/``clamp``, ``concatenate``/``cat``, unsigned
integers).  Rules that keep the two libraries bit-identical:

* float32 element-wise arithmetic only (IEEE: the same on both), no fused or
  reordered float32 reductions;
* sums that must be exact are taken in float64 over integer values (order-free);
* the counter hash works on int64 holding 32-bit values, masked after every
  multiply (the low 32 bits of a wrapped 64-bit product are exact).
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, is_torch_array

MASK32 = 0xFFFFFFFF
MIX = (2654435761, 2246822507, 3266489909)     # mix32's multipliers
MIX2 = (2146121005, 2221713035)                # mix2's multipliers
SQRT3 = 1.7320508
KEY_VALUES = 4096  # the row key reads the first KEY_VALUES partial sums of a row


def _xp(x):
    """The array namespace of ``x`` (numpy for Python and numpy scalars)."""
    return array_namespace(np.asarray(x) if isinstance(x, (int, float, np.generic)) else x)


def _as_f32(xp, x):
    """``x`` as float32: ``x`` itself when it is float32 already (``astype`` copies by default,
    a whole pass over a partial-sum-sized tensor; the formulas never write into their inputs)."""
    return xp.astype(x, xp.float32, copy=False)


def _f32(xp, v, like):
    """``v`` (a number, a numpy array or an array of ``like``'s library) as float32 in that library."""
    if isinstance(v, (int, float, np.generic, np.ndarray)):
        if not isinstance(like, np.ndarray):
            return xp.asarray(np.asarray(v, np.float32), device=like.device)
        return xp.astype(xp.asarray(v), xp.float32)
    return _as_f32(xp, v)


# ---------------------------------------------------------------- input quantization
def input_range(bits: int, signed: int) -> tuple[float, float]:
    """Integer range of a quantized input: [0, 2^b-1] or [-2^(b-1), 2^(b-1)-1]."""
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2 ** bits - 1)


def quantize_input(x, scale, *, bits: int, signed: int):
    """q = clip(round(x / s), lo, hi): the integer input (as float32) of every array."""
    return quantize_input_parts(x, scale, bits=bits, signed=signed)[0]


def quantize_input_parts(x, scale, *, bits: int, signed: int):
    """``quantize_input``'s value and the step to it, for gradients: (q, v = x / s)."""
    xp = _xp(x)
    lo, hi = input_range(bits, signed)
    x = _as_f32(xp, x)
    v = x / _f32(xp, scale, x)
    return xp.clip(xp.round(v), lo, hi), v


def plane_weights(bits: int, signed: int) -> np.ndarray:
    """Recombination weight of each bit plane: 2^p, the MSB -2^(b-1) when signed."""
    w = np.array([2.0 ** p for p in range(bits)], np.float32)
    if signed:
        w[-1] = -w[-1]
    return w


def bit_planes(q, *, bits: int, signed: int):
    """The ``bits`` bit planes of integer inputs ``q`` (two's complement when signed),
    stacked along axis 0: plane p of every row, then plane p+1."""
    xp = _xp(q)
    q = _as_f32(xp, q)
    u = xp.where(q < 0, q + float(2 ** bits), q)
    planes = []
    for _ in range(bits):          # u = floor(q' / 2^p) (exact halvings); its parity is plane p
        half = xp.floor(u * 0.5)
        planes.append(u - (half + half))
        u = half
    return xp.concat(planes, axis=0)


# ---------------------------------------------------------------- weights
def quantize_weight(w, scale, *, bits: int):
    """q_w = clip(round(W / s_w), -(2^(b-1)-1), 2^(b-1)-1), one scale per output column
    (axis 0 of ``w``): the integer weights of every scheme."""
    xp = _xp(w)
    qmax = float(2 ** (bits - 1) - 1)
    w = _as_f32(xp, w)
    s = xp.reshape(_f32(xp, scale, w), (-1, *([1] * (w.ndim - 1))))
    return xp.clip(xp.round(w / s), -qmax, qmax)


def _digits(v, bits: int, cell: int) -> list:
    """Non-negative integers of ``bits`` bits -> unsigned ``cell``-bit digits, least significant first."""
    xp = _xp(v)
    n = -(-bits // cell)
    return [xp.floor(v / float(2 ** (cell * j))) % float(2 ** cell) for j in range(n)]


def weight_slices(q, *, bits: int, cell_bits: int, differential: bool):
    """The weight slices of integer weights ``q`` stacked on a new axis 0, in the mapping's
    slice order: ``differential``: the cells of max(q, 0), then those of max(-q, 0)
    (``bits`` - 1 magnitude bits); else the unsigned low cells of q and a signed top cell.
    ``cell_bits`` 0 puts the whole value (or magnitude) in one cell."""
    xp = _xp(q)
    q = _as_f32(xp, q)
    if differential:
        mag = bits - 1
        c = cell_bits or mag
        zero = xp.zeros_like(q)
        parts = _digits(xp.maximum(q, zero), mag, c) + _digits(xp.maximum(-q, zero), mag, c)
    else:
        c = cell_bits or bits
        n = -(-bits // c)
        if n == 1:
            parts = [q]
        else:
            top_shift = float(2 ** (c * (n - 1)))
            parts = _digits(q % top_shift, c * (n - 1), c)[: n - 1] + [xp.floor(q / top_shift)]
    return xp.stack(parts, axis=0)


# ---------------------------------------------------------------- ideal ADC
def adc_quantize(s, scale, zero_point, *, bits: int):
    """Ideal ADC: code = clip(round(s / Delta) + z, 0, 2^b-1), value (code - z) * Delta."""
    return adc_quantize_parts(s, scale, zero_point, bits=bits)[0]


def adc_quantize_parts(s, scale, zero_point, *, bits: int):
    """``adc_quantize``'s value and the steps to it, for gradients: (value, v = s / Delta,
    round(v), the unclipped code round(v) + z, the clipped code)."""
    xp = _xp(s)
    s = _as_f32(xp, s)
    scale, zp = _f32(xp, scale, s), _f32(xp, zero_point, s)
    v, r, code = _ideal_code(xp, s, scale, zp)
    clipped = xp.clip(code, 0.0, float(2 ** bits - 1))
    return (clipped - zp) * scale, v, r, code, clipped


def _ideal_code(xp, s, scale, zp):
    """The ideal ADC's unclipped code round(s / Delta) + z, with its steps (v = s / Delta, round(v))."""
    v = s / scale
    r = xp.round(v)
    return v, r, r + zp


def adc_code(s, scale, zero_point, gain=None, offset=None, lut=None, noise=None):
    """The ADC's output code before clipping to [0, 2^b-1]: ideal round(s / Delta) + z; on a
    chip (``gain`` given) round(f_NL(gain * s / Delta + offset + z) + noise), f_NL the transfer
    curve ``lut`` (when it has >= 2 levels).  Layer statistics count clipping with it."""
    xp = _xp(s)
    s = _as_f32(xp, s)
    scale, zp = _f32(xp, scale, s), _f32(xp, zero_point, s)
    if gain is None:
        return _ideal_code(xp, s, scale, zp)[2]
    gain, offset = _f32(xp, gain, s), _f32(xp, offset, s)
    w = gain * (s / scale) + offset + zp
    if lut is not None:
        lut = _f32(xp, lut, s)
        if lut.shape[0] >= 2:
            w = transfer(w, lut)
    return xp.round(w if noise is None else w + noise)


# ---------------------------------------------------------------- recombination
def recombine(a, coef, *, planes: int, groups: int, tiles: int, slices: int):
    """Sum the array columns of rows (plane, image) over planes, tiles and slices with
    weights ``coef`` (planes, slices), in float64 (exact for these integer-valued
    sums, so the order does not matter), to (images, groups * cout_g, ...)."""
    xp = _xp(a)
    a = _as_f32(xp, a)
    rows, cols, rest = a.shape[0], a.shape[1], tuple(a.shape[2:])
    cout_g = cols // (groups * tiles * slices)
    r = xp.reshape(a, (planes, rows // planes, groups, tiles * slices, -1))
    c = np.broadcast_to(np.asarray(_f32(xp, coef, a)).reshape(planes, 1, slices), (planes, tiles, slices))
    c = c.reshape(planes, tiles * slices).astype(np.float64).tolist()
    # term by term in the native kernels' order (planes, then tiles, then slices), each term's
    # float64 product added to the output-sized accumulator: one read of the float32 values (a
    # contraction engine copied them to float64 and transposed them first, 10x the time); + 0.0:
    # a zero sum is +0.0 whatever the signs of its zero terms
    acc = None
    for p in range(planes):
        for k in range(tiles * slices):
            acc = _add_term(xp, acc, r[p, :, :, k, :], c[p][k])
    acc = acc + 0.0
    return xp.astype(xp.reshape(acc, (rows // planes, groups * cout_g, *rest)), xp.float32)


def _add_term(xp, acc, t, k: float):
    """acc + float64(t) * k (t float32, k a float32 coefficient as a Python float; acc None: the
    first term).  float64(t) * k is exact (two 24-bit significands), so torch's in-place add with
    ``alpha`` (one pass over t, no float64 copy of it; fused multiply-add or not, the product
    needs no rounding) gives the same values as the separate product and sum."""
    if acc is None:
        return xp.astype(t, xp.float64) * k
    if is_torch_array(acc):
        return acc.add_(t, alpha=k)
    return acc + xp.astype(t, xp.float64) * k


# ---------------------------------------------------------------- counter-hash noise
def mix32(x):
    """A 32-bit integer hash (three multiplies), on int64 arrays holding values < 2^32."""
    with np.errstate(over="ignore"):   # numpy scalars warn when a product wraps; the low 32 bits are exact
        return _mix32(x)


def _mix32(x):
    xp = _xp(x)
    x = xp.astype(xp.asarray(x), xp.int64) & MASK32
    x = (x * MIX[0]) & MASK32
    x = (x + (x >> 16)) & MASK32
    x = (x * MIX[1]) & MASK32
    x = (x + (x >> 13)) & MASK32
    x = (x * MIX[2]) & MASK32
    return (x + (x >> 16)) & MASK32


def mix2(x):
    """The cheaper two-multiply mix used per conversion."""
    with np.errstate(over="ignore"):
        return _mix2(x)


def _mix2(x):
    xp = _xp(x)
    x = xp.astype(xp.asarray(x), xp.int64) & MASK32
    x = (x + (x >> 16)) & MASK32
    x = (x * MIX2[0]) & MASK32
    x = (x + (x >> 15)) & MASK32
    x = (x * MIX2[1]) & MASK32
    return (x + (x >> 16)) & MASK32


def row_keys(s):
    """Per batch row: sum of floor(16 s) over the row's first KEY_VALUES values, in
    float64 (exact, order-free), modulo 2^32, as int64."""
    xp = _xp(s)
    s = _as_f32(xp, s)
    flat = xp.reshape(s, (s.shape[0], -1))[:, :KEY_VALUES]
    f = xp.sum(xp.floor(xp.astype(flat, xp.float64) * 16.0), axis=1)
    return xp.astype(xp.remainder(xp.abs(f), 2.0 ** 32), xp.int64)


def thermal_noise(s, sigma: float, seed: int):
    """Noise of every conversion of ``s``: sigma * sqrt(3) * z, z the Irwin-Hall sum of the
    four bytes of a counter hash of (seed, the row's values, the position) scaled to
    mean 0 and variance 1; independent of the other rows of the batch."""
    xp = _xp(s)
    rows = s.shape[0]
    n = 1
    for d in s.shape[1:]:
        n *= int(d)
    dev = getattr(s, "device", None)
    key = mix32(row_keys(s) + int(mix32(np.asarray([seed], np.int64))[0]))[:, None]
    h = mix2(mix32(xp.arange(n, dtype=xp.int64, device=dev))[None, :] + key)
    # the sum of h's four bytes: bytes 0+1 and 2+3 pairwise in 16-bit lanes, then the lanes (exact)
    t = (h & 0x00FF00FF) + ((h >> 8) & 0x00FF00FF)
    f = xp.astype((t & 0xFFFF) + (t >> 16), xp.float32)
    z = (f + 2.0) / 256.0 - 2.0
    scale = float(np.float32(sigma) * np.float32(SQRT3))
    return xp.reshape(_f32(xp, scale, z) * z, (rows, *tuple(s.shape[1:])))


# ---------------------------------------------------------------- non-ideal ADC
def transfer(w, lut):
    """Piecewise-linear transfer curve over the code domain; identity slope outside."""
    xp = _xp(w)
    L = lut.shape[0]
    wc = xp.clip(w, 0.0, float(L - 1))
    k0 = xp.astype(xp.clip(xp.floor(wc), None, float(L - 2)), xp.int64)
    frac = wc - xp.astype(k0, xp.float32)
    lo, hi = lut[k0], lut[k0 + 1]
    return lo + frac * (hi - lo) + (w - wc)


def adc_quantize_nonideal(s, scale, zero_point, gain, offset, lut, *, bits: int, noise_sigma: float, seed: int):
    """Non-ideal ADC: w = gain * (s / Delta) + offset + z through the transfer curve
    ``lut`` (when it has >= 2 levels), plus thermal noise, rounded and clipped."""
    xp = _xp(s)
    s = _as_f32(xp, s)
    scale, zp = _f32(xp, scale, s), _f32(xp, zero_point, s)
    noise = thermal_noise(s, noise_sigma, seed) if noise_sigma > 0 else None
    code = xp.clip(adc_code(s, scale, zp, gain, offset, lut, noise), 0.0, float(2 ** bits - 1))
    return (code - zp) * scale


def adc_recombine(s, scale, zero_point, coef, *, bits, planes, groups, tiles, slices):
    return recombine(adc_quantize(s, scale, zero_point, bits=bits), coef, planes=planes, groups=groups,
                     tiles=tiles, slices=slices)


def adc_recombine_nonideal(s, scale, zero_point, gain, offset, lut, coef, *, bits, noise_sigma, seed, planes,
                           groups, tiles, slices):
    a = adc_quantize_nonideal(s, scale, zero_point, gain, offset, lut, bits=bits, noise_sigma=noise_sigma, seed=seed)
    return recombine(a, coef, planes=planes, groups=groups, tiles=tiles, slices=slices)
