"""Calibration methods: streaming histograms and the clipping range each method picks.

The compiler calibrates two kinds of ranges (``--act-calib`` and ``--adc-calib``):

* a layer's **input activations**, one range per layer: unsigned inputs (never negative)
  are quantized on ``[0, T]``, signed ones symmetrically on ``[-T, T]``
  (``planning.input_scale``);
* each **ADC column's partial sums**, one range ``[lo, hi]`` (containing 0) per column
  (``planning.adc_params``).

Methods (``METHOD[:P]``):

``max``
    the observed minimum and maximum (no clipping; exact, needs no histogram);
``percentile[:P]``
    activations: ``T`` = the P-th percentile of ``|x|`` (P = 99.99 when not given);
    ADC columns: the ``(100-P)/2``-th and ``(100+P)/2``-th percentiles (the tails cut
    evenly, as onnxruntime.quantization's asymmetric percentile calibrator does);
``mse``
    the range ``a * [lo, hi]`` (``a`` in (0, 1], ``[lo, hi]`` the observed range) whose
    quantizer gives the least mean squared error over the histogram, searched per tensor
    or per column (a coarse grid of 32 factors, then 16 around the best);
``entropy``
    the same search, minimising the KL divergence between the clipped distribution and
    its quantized version (the TensorRT / onnxruntime ``entropy`` calibrator's criterion:
    outliers folded into the edge bins, each level's mass spread evenly over its
    non-empty bins; the bin of exact zeros counted as its neighbour, as
    pytorch-quantization does; ranges that clip more than 2 % of the samples are not
    candidates: they fold most samples into one edge bin and score near 0).

Histograms stream (:class:`Histograms`): bounded memory per tensor or column, whatever
the number of calibration samples.  Bins share the origin 0 and have a power-of-two
width that doubles (merging bin pairs exactly) when a value falls outside; integer data
(partial sums) start at width 1, so a column whose values span at most ``bins/2``
integers on each side of 0 is histogrammed exactly.

Numpy only.  onnxruntime.quantization's ``HistogramCollector`` does one histogram per
tensor with Python loops per threshold candidate (about a second per tensor for entropy),
which cannot serve thousands of ADC columns; the tests use it as the reference for
``percentile`` and ``entropy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import PimcError
from .planning import adc_params, input_steps

METHODS = ("max", "percentile", "mse", "entropy")
DEFAULT_PERCENTILE = 99.99
MAX_CLIPPED = 0.02    # entropy: candidate ranges may clip at most this share of the samples


@dataclass(frozen=True)
class CalibMethod:
    name: str
    percentile: float | None = None

    def __str__(self) -> str:
        return self.name if self.percentile is None else f"{self.name}:{self.percentile:g}"

    @property
    def needs_histogram(self) -> bool:
        return self.name != "max"


def parse_method(text: str, option: str) -> CalibMethod:
    """``METHOD[:P]`` -> CalibMethod, or a one-line PimcError naming ``option``."""
    name, sep, arg = str(text).partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise PimcError(f"{option}: '{text}' is not a calibration method; choose one of: max, percentile[:P], "
                        f"mse, entropy")
    if name != "percentile":
        if sep:
            raise PimcError(f"{option}: method '{name}' takes no parameter (got '{text}')")
        return CalibMethod(name)
    if not sep:
        return CalibMethod(name, DEFAULT_PERCENTILE)
    try:
        p = float(arg)
    except ValueError:
        raise PimcError(f"{option}: '{text}': the percentile must be a number, e.g. percentile:99.99") from None
    if not (50.0 < p <= 100.0):
        raise PimcError(f"{option}: '{text}': the percentile must be in (50, 100], e.g. percentile:99.99")
    return CalibMethod(name, p)


class Histograms:
    """One streaming histogram per column (row of the arrays given to :meth:`update`).

    Bin ``j`` of a column with width ``w`` holds ``[(j - bins/2) w, (j - bins/2 + 1) w)``;
    ``w`` is a power of two (at least 1 for ``integer`` data) and doubles when a value
    would fall outside, merging bin pairs.  The exact minimum and maximum are kept too."""

    def __init__(self, columns: int, bins: int = 512, integer: bool = False):
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins, self.half, self.integer = bins, bins // 2, integer
        self.counts = np.zeros((columns, bins), np.int64 if bins * columns < 2 ** 22 else np.int32)
        self.width = np.zeros(columns)          # 0: not set yet
        self.lo = np.full(columns, np.inf)
        self.hi = np.full(columns, -np.inf)

    def _fits(self, lo, hi, w):
        return (hi < self.half * w) & (lo >= -self.half * w)

    def update(self, x: np.ndarray, axis: int = 0) -> None:
        """Add samples ``x``: the columns along ``axis`` (e.g. (columns, m), or an (N, C, H, W)
        map with ``axis=1``), every other entry a sample of its column."""
        x = np.asarray(x)
        if x.size == 0:
            return
        others = tuple(i for i in range(x.ndim) if i != axis)
        lo, hi = x.min(axis=others).astype(np.float64), x.max(axis=others).astype(np.float64)
        self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
        new = self.width == 0
        if new.any():
            amax = np.maximum(np.abs(lo[new]), np.abs(hi[new]))
            w = np.exp2(np.ceil(np.log2(np.maximum(amax, 1e-30) / (self.half - 1))))
            self.width[new] = np.maximum(w, 1.0) if self.integer else w
        while True:
            grow = ~self._fits(lo, hi, self.width)
            if not grow.any():
                break
            c = self.counts[grow]
            merged = c.reshape(len(c), self.bins // 2, 2).sum(axis=2)
            c[:] = 0
            c[:, self.half // 2: self.half // 2 + self.bins // 2] = merged
            self.counts[grow] = c
            self.width[grow] *= 2
        shape = [1] * x.ndim
        shape[axis] = len(self.width)
        small = self.counts.size < 2 ** 31
        kt = np.int32 if small else np.int64
        base = (np.arange(len(self.width), dtype=kt) * self.bins + self.half).reshape(shape)
        if self.integer:   # integer values, power-of-two widths >= 1: floor division is a shift, exact
            shift = np.log2(self.width).astype(kt).reshape(shape)
            idx = np.right_shift(x.astype(kt), shift)
            idx += base
        else:
            idx = np.floor(x / self.width.reshape(shape).astype(x.dtype if x.dtype.kind == "f" else np.float64))
            idx = idx.astype(kt)
            idx += base
            np.maximum(idx, base - self.half, out=idx)   # float rounding at the edges stays in the column's bins
            np.minimum(idx, base + self.half - 1, out=idx)
        self.counts += np.bincount(idx.ravel(), minlength=self.counts.size).reshape(self.counts.shape).astype(
            self.counts.dtype)   # int32 for many columns (memory): counts stay far below 2^31

    def rows(self, sel) -> "Histograms":
        """A view of some rows (columns) as a Histograms of their own."""
        out = Histograms.__new__(Histograms)
        out.bins, out.half, out.integer = self.bins, self.half, self.integer
        out.counts, out.width, out.lo, out.hi = self.counts[sel], self.width[sel], self.lo[sel], self.hi[sel]
        return out

    def values(self) -> np.ndarray:
        """(columns, bins) value each bin stands for: its centre (integer data: the mean of
        the integers it holds)."""
        j = np.arange(self.bins) - self.half
        w = self.width[:, None]
        return j * w + ((w - 1) / 2 if self.integer else w / 2)


# --- quantizer models the searches measure (the rules of pimc.core.planning) -------------

def _act_grid(lo, hi, bits):
    """(step, zero, levels) of the activation quantizer for range [lo, hi]:
    ``planning.input_steps`` (signed when lo < 0)."""
    step, signed = input_steps(lo, hi, bits)
    zero = np.where(signed, 2 ** (bits - 1), 0)
    return step, zero, 2 ** bits


def _adc_grid(lo, hi, bits):
    delta, z = adc_params(lo, hi, bits)
    return delta.astype(np.float64), z.astype(np.float64), 2 ** bits


def _quantized(v, step, zero, levels):
    k = np.clip(np.round(v / step) + zero, 0, levels - 1)
    return k, (k - zero) * step


def _weighted_quantile(values, counts, q):
    """Per row: the smallest value whose cumulative share of counts reaches q."""
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, axis=1)
    c = np.take_along_axis(counts, order, axis=1).astype(np.float64)
    cdf = np.cumsum(c, axis=1)
    tot = cdf[:, -1:]
    idx = np.argmax(cdf >= q * np.maximum(tot, 1e-300), axis=1)
    return v[np.arange(len(v)), idx]


def _mse(v, counts, lo, hi, grid, bits):
    step, zero, L = grid(lo, hi, bits)
    _, q = _quantized(v, step[:, None], zero[:, None], L)
    return np.sum(counts * (q - v) ** 2, axis=1)


def _kl(v, counts, lo, hi, grid, bits):
    step, zero, L = grid(lo, hi, bits)
    C, B = v.shape
    inside = (v >= lo[:, None]) & (v <= hi[:, None])
    sliced = np.where(inside, counts, 0).astype(np.float64)
    p = sliced.copy()
    rows = np.arange(C)
    first = np.argmax(inside, axis=1)
    last = B - 1 - np.argmax(inside[:, ::-1], axis=1)
    below = np.sum(np.where(v < lo[:, None], counts, 0), axis=1)
    above = np.sum(np.where(v > hi[:, None], counts, 0), axis=1)
    p[rows, first] += below
    p[rows, last] += above
    k, _ = _quantized(v, step[:, None], zero[:, None], L)
    keys = (rows[:, None] * L + k.astype(np.int64))
    mass = np.bincount(keys.ravel(), weights=sliced.ravel(), minlength=C * L)
    nz = np.bincount(keys.ravel(), weights=((p > 0) & inside).ravel().astype(np.float64), minlength=C * L)
    q = np.where((p > 0) & inside, mass[keys] / np.maximum(nz[keys], 1), 0.0)
    ps = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    qs = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    qs = np.where((ps > 0) & (qs <= 0), 1e-12, qs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ps > 0, ps * np.log(ps / qs), 0.0)
    clipped = (below + above) / np.maximum(counts.sum(axis=1), 1)
    # a range that clips most samples folds them into one edge bin that p and q then share:
    # a divergence near 0 for a useless range (columns whose values sit far from 0)
    return np.where(clipped > MAX_CLIPPED, np.inf, terms.sum(axis=1))


def _entropy_counts(h: Histograms) -> np.ndarray:
    """The counts the entropy search compares: the bin holding 0 takes its larger neighbour's
    count (as pytorch-quantization's entropy calibrator drops its first bin): the spike of
    exact zeros (ReLU outputs, idle columns) would otherwise dominate the divergence and
    pull every range towards 0."""
    c = h.counts.copy()
    c[:, h.half] = np.maximum(c[:, h.half - 1], c[:, h.half + 1])
    return c


def _search(v, counts, lo0, hi0, grid, bits, loss):
    """Per row: the factor a in (0, 1] of the range a*[lo0, hi0] with the least loss."""
    best_a = np.ones(len(v))
    best = loss(v, counts, lo0, hi0, grid, bits)
    coarse = np.linspace(1.0 / 32, 1.0, 32)
    for a in coarse[:-1]:
        e = loss(v, counts, a * lo0, a * hi0, grid, bits)
        better = e < best
        best, best_a = np.where(better, e, best), np.where(better, a, best_a)
    step = coarse[1] - coarse[0]
    centre = best_a.copy()
    for f in np.linspace(-1, 1, 16):
        a = np.clip(centre + f * step, 1e-3, 1.0)
        e = loss(v, counts, a * lo0, a * hi0, grid, bits)
        better = e < best
        best, best_a = np.where(better, e, best), np.where(better, a, best_a)
    return best_a


def activation_ranges(h: Histograms, method: CalibMethod, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per histogram row: the clipping range (lo, hi) of a ``bits``-bit activation quantizer:
    (-T, T) for rows that went negative, (0, T) otherwise; ``max``: the observed range."""
    lo, hi = h.lo.copy(), h.hi.copy()
    if method.name == "max":
        return lo, hi
    signed = lo < 0
    amax = np.where(signed, np.maximum(-lo, hi), np.maximum(hi, 0))
    v = h.values()
    if method.name == "percentile":
        t = _weighted_quantile(np.abs(v), h.counts, method.percentile / 100.0)
        t = np.minimum(t, amax)
    else:
        lo0 = np.where(signed, -amax, 0.0)
        loss = _mse if method.name == "mse" else _kl
        counts = _entropy_counts(h) if method.name == "entropy" else h.counts
        t = _search(v, counts, lo0, amax, _act_grid, bits, loss) * amax
    t = np.where(t > 0, t, amax)
    return np.where(signed, -t, 0.0), t


def adc_ranges(h: Histograms, method: CalibMethod, bits: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per histogram row (ADC column): the partial-sum range [lo, hi] (widened to contain 0)
    that ``planning.adc_params`` turns into the column's step and zero point; searched
    ``block`` columns at a time (bounded memory)."""
    if len(h.counts) > block:
        parts = [adc_ranges(h.rows(slice(i, i + block)), method, bits, block) for i in range(0, len(h.counts), block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    lo0, hi0 = np.minimum(h.lo, 0), np.maximum(h.hi, 0)
    if method.name == "max":
        return lo0, hi0
    v = h.values()
    if method.name == "percentile":
        tail = (100.0 - method.percentile) / 200.0
        lo = np.maximum(np.minimum(_weighted_quantile(v, h.counts, tail), 0), lo0)
        hi = np.minimum(np.maximum(_weighted_quantile(v, h.counts, 1 - tail), 0), hi0)
    else:
        loss = _mse if method.name == "mse" else _kl
        a = _search(v, _entropy_counts(h) if method.name == "entropy" else h.counts, lo0, hi0, _adc_grid, bits, loss)
        lo, hi = a * lo0, a * hi0
    return _with_spare_levels(lo, hi, bits)


def _with_spare_levels(lo, hi, bits):
    """A range that spans fewer than the 2^b - 1 steps of a unit-step ADC, widened to use them
    all, the spare levels shared between the sides in proportion to their extent (a column
    that never goes negative keeps them all above 0): the histogram methods read a sample,
    and a column that the sample shows to be lossless must stay lossless on the values it
    missed."""
    spare = np.maximum((2 ** bits - 1) - np.floor(hi - lo), 0)
    ext = np.maximum(hi - lo, 1e-30)
    below = np.floor(spare * (-lo) / ext)
    return lo - below, hi + (spare - below)


def subsample_step(spatial: int, per_sample: int = 64) -> int:
    """Stride over each spatial axis that keeps about ``per_sample`` positions of a
    ``spatial``-position feature map (1 when it is small)."""
    return max(1, int(round(math.sqrt(spatial / per_sample))))
