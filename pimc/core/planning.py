"""Planning rules: pure functions over numbers and layer plans that the passes decide
with, that BN calibration recomputes and that training will call, so that each rule
exists once (the passes only store their results and have the emitter write nodes).

* ``input_scale``: the step of a layer's quantized inputs from their observed range;
* ``quantize_columns``: per-output-column symmetric weight scales and integer weights;
* ``plan_tiles`` (``check_kernel_fits``): the weight rows of each column on R x C arrays;
* ``plan_slices``: differential / cell slices of the integer weights (``formulas.weight_slices``)
  and their recombination coefficients;
* ``bn_affine``: an inference BatchNorm as a per-channel scale and shift;
* ``array_weights``: every array column's cells, in the IR's column order
  (group, tile, slice, out_channel); ``chunk_columns`` a chunk's columns in that order;
* ``plan_chunks`` (``tile_classes``, ``chunk_width``, ``layer_chunks``): which (tile, slice)
  pairs share one array conv, ADC and recombination; ``chunk_arrays`` what one chunk computes
  with (channel gather, cells, recombination coefficients);
* ``full_range``: each column's worst-case partial-sum range;
* ``adc_params``: the step Delta and integer zero point z of each ADC column from its
  partial-sum range;
* ``output_affine``: the per-column scale and bias that turn the integer accumulator
  into the layer's output.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import formulas as F
from .errors import PimcError
from .mapping import LayerMapping, LayerPlan, SlicePlan, TilePlan, WeightQuant, column_indices, tiles_width


def input_scale(lo: float, hi: float, bits: int) -> tuple[float, bool]:
    """(scale, signed) of ``bits``-bit inputs observed in [lo, hi]: unsigned when they never
    go negative, q in [0, 2^b-1], s = hi/(2^b-1); else signed two's complement,
    q in [-2^(b-1), 2^(b-1)-1], s = max|x|/(2^(b-1)-1) (max|x| at 1 bit).  A degenerate
    range gives s = 1.  The scale is rounded to float32 (as the IR stores it)."""
    scale, signed = input_steps(np.float64(lo), np.float64(hi), bits)
    return float(np.float32(scale)), bool(signed)


def input_steps(lo, hi, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_scale``'s rule over arrays of ranges (float64, not rounded): (step, signed) per
    range; the calibration searches measure candidate ranges with it."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    signed = lo < 0
    amax = np.maximum(np.abs(lo), np.abs(hi))
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(signed, amax / (2 ** (bits - 1) - 1 if bits > 1 else 1), hi / (2 ** bits - 1))
    return np.where(np.isfinite(step) & (step > 0), step, 1.0), signed


def adc_params(s_min: np.ndarray, s_max: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column: Delta = max(1, (s_max - s_min)/(2^b - 1)) and z = round(-s_min/Delta), float32.
    Delta >= 1 keeps a column whose range fits in 2^b levels lossless."""
    span = np.maximum(s_max - s_min, 0)
    delta = np.maximum(1.0, span / (2 ** bits - 1)).astype(np.float32)
    z = np.round(-s_min / delta).astype(np.float32)
    return delta, z


def frozen_range(delta: np.ndarray, z: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The partial-sum range a given step and zero point span: [-z Delta, (2^b - 1 - z) Delta], float32."""
    delta, z = np.asarray(delta, np.float32), np.asarray(z, np.float32)
    return (-z * delta).astype(np.float32), ((2 ** bits - 1 - z) * delta).astype(np.float32)


def output_affine(input_scale: float, weight_scales, scale, bias, shift,
                  rescale: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(out_scale, out_bias) per output channel, float32: out_scale = float32(s_x) * s_w * scale
    (times float32(rescale), a trained PIM-QAT rescaling factor, when given) and
    out_bias = bias * scale + shift, where (scale, shift) is the BatchNorm kept after the
    arrays (scale 1 and no shift without one); out_bias is None when there is neither bias
    nor shift."""
    scale = np.asarray(scale, np.float32)
    out_scale = (np.float32(input_scale) * np.asarray(weight_scales, np.float32) * scale).astype(np.float32)
    if rescale is not None:
        out_scale = (out_scale * np.float32(rescale)).astype(np.float32)
    if shift is None:
        return out_scale, None if bias is None else np.asarray(bias, np.float32)
    b = np.zeros(scale.shape, np.float32) if bias is None else np.asarray(bias, np.float32)
    return out_scale, (b * scale + np.asarray(shift, np.float32)).astype(np.float32)


def quantize_columns(w: np.ndarray, bits: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q_w, s_w): one symmetric scale per output column (axis 0), s_w = max|W| / (2^(b-1)-1)
    (1 for an all-zero column) unless ``scale`` is given (a frozen plan: used as given), and
    q_w = ``formulas.quantize_weight`` (clip(round(W / s_w), -(2^(b-1)-1), 2^(b-1)-1))."""
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        amax = np.max(np.abs(w.reshape(w.shape[0], -1)), axis=1).astype(np.float32)
        scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
    else:
        scale = np.asarray(scale, np.float32)
    return F.quantize_weight(w, scale, bits=bits).astype(np.float32), scale


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """An inference BatchNorm as a per-channel affine (scale, shift), in float64:
    scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in (gamma, beta, mean, var))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def check_kernel_fits(p: LayerPlan, rows: int, mode: str) -> None:
    """Channel-aligned tiles need a whole kernel per array; say so early."""
    kh, kw = p.kernel
    if mode == "channel" and rows < kh * kw:
        raise PimcError(f"layer '{p.name}': a {kh}x{kw} kernel needs {kh * kw} rows but --array-rows is {rows}; "
                        f"use --tile-mode row or larger arrays")


def plan_tiles(p: LayerPlan, rows: int, cols: int, mode: str) -> TilePlan:
    kh, kw = p.kernel
    k = kh * kw
    cin_g = p.cin_g
    if mode == "channel":
        check_kernel_fits(p, rows, mode)
        cpa = rows // k
        T = math.ceil(cin_g / cpa)
        m = min(cpa, cin_g)
        channel = np.full((T, m), -1, np.int64)
        for t in range(T):
            for j in range(m):
                c = t * cpa + j
                if c < cin_g:
                    channel[t, j] = c
        mask = np.ones((T, m, kh, kw), np.float32)
        mask[channel < 0] = 0
        rows_used = [int(np.sum(channel[t] >= 0)) * k for t in range(T)]
    else:
        K = cin_g * k
        T = math.ceil(K / rows)
        spans = []
        for t in range(T):
            r0, r1 = t * rows, min((t + 1) * rows, K)
            spans.append((r0 // k, (r1 - 1) // k, r0, r1))
        m = max(c1 - c0 + 1 for c0, c1, _, _ in spans)
        channel = np.full((T, m), -1, np.int64)
        mask = np.zeros((T, m, kh, kw), np.float32)
        rows_used = []
        for t, (c0, c1, r0, r1) in enumerate(spans):
            for j in range(c1 - c0 + 1):
                c = c0 + j
                channel[t, j] = c
                rr = c * k + np.arange(k)
                mask[t, j] = ((rr >= r0) & (rr < r1)).reshape(kh, kw)
            rows_used.append(r1 - r0)
    return TilePlan(mode=mode, array_rows=rows, array_cols=cols, tiles_per_group=T, channels_per_tile=m,
                    tile_channels=channel, mask=mask,
                    rows_used=rows_used)


def plan_slices(bits_w: int, cell_bits: int, differential: bool, q: np.ndarray):
    """(names, coefficients, cell range, slices) of the weight slices of integer weights ``q``
    (``formulas.weight_slices``): differential halves and/or cells of ``cell_bits`` bits."""
    weights = F.weight_slices(q, bits=bits_w, cell_bits=cell_bits, differential=differential).astype(np.float32)
    n = weights.shape[0]
    if differential:
        c = cell_bits or (bits_w - 1)
        half = n // 2
        names = [f"pos.c{j}" for j in range(half)] + [f"neg.c{j}" for j in range(half)]
        coef = [2.0 ** (c * j) for j in range(half)] + [-(2.0 ** (c * j)) for j in range(half)]
        cell_range = (0, 2 ** c - 1)
    else:
        c = cell_bits or bits_w
        names = [f"c{j}" for j in range(n)]
        coef = [2.0 ** (c * j) for j in range(n)]
        top_bits = bits_w - c * (n - 1)
        cell_range = (-(2 ** (top_bits - 1)), 2 ** c - 1 if n > 1 else 2 ** (top_bits - 1) - 1)
    return names, np.array(coef, np.float32), cell_range, weights


REFERENCE_BATCH = 256


def plan_chunks(p, chunk_mib: int) -> list[tuple[int, int, int, int]]:
    """Split the (tile, slice) pairs so each chunk's partial sums fit the budget.

    Tiles of different widths never share a chunk (see lowering.tile_classes).
    """
    T, S = p.n_tiles, p.n_slices
    spatial = p.out_spatial() or [32, 32]
    pair_bytes = 4 * p.n_planes * REFERENCE_BATCH * p.group * p.cout_g * int(np.prod(spatial))
    pairs = max(1, int(chunk_mib * 2 ** 20 // pair_bytes))
    if pairs >= S:
        return tile_classes(p, 0, S, step=max(1, pairs // S))
    return [(t, t + 1, s, min(s + pairs, S)) for t in range(T) for s in range(0, S, pairs)]


def chunk_width(p: LayerPlan, t0: int, t1: int) -> int:
    """Input channels the tiles t0..t1 need: padding slots past the last real one are dropped."""
    return tiles_width(p.tiling.tile_channels, t0, t1)


def tile_classes(p: LayerPlan, s0: int, s1: int, step: int | None = None) -> list[tuple[int, int, int, int]]:
    """Chunks over tiles (at most ``step`` per chunk) that never mix tiles of different widths.

    In channel mode the last tile often holds fewer channels; giving it its own
    array conv avoids multiplying padding channels.
    """
    T = p.n_tiles
    widths = [chunk_width(p, t, t + 1) for t in range(T)]
    out, t = [], 0
    while t < T:
        e = t + 1
        while e < T and widths[e] == widths[t] and (step is None or e - t < step):
            e += 1
        out.append((t, e, s0, s1))
        t = e
    return out


def layer_chunks(p) -> list[tuple[int, int, int, int]]:
    """The layer's chunks (t0, t1, s0, s1): as planned, or before slicing one per class of
    equally wide tiles over all slices."""
    return p.chunks or tile_classes(p, 0, p.n_slices)


def chunk_columns(p: LayerPlan, chunk) -> np.ndarray:
    """Global column indices (group, tile, slice, out_channel order) of a chunk."""
    return column_indices(p.group, p.n_tiles, p.n_slices, p.cout_g, *chunk)


def array_weights(p: LayerPlan) -> np.ndarray:
    """Cell values of every array column: (G*T*S*cout_g, m, kh, kw).

    Column order (group, tile, slice, out_channel); row j of a tile holds local
    input channel ``tiling.tile_channels[t, j]`` (zero for padding slots and for
    kernel rows of another tile in row mode).
    """
    tp, sp, wq = p.tiling, p.slicing, p.weight_quant
    slices = sp.weights if sp is not None else wq.q[None]
    g, T, S, cout_g = p.group, tp.tiles_per_group, slices.shape[0], p.cout_g
    kh, kw = p.kernel
    dtype = np.float64 if slices.dtype == np.float64 else np.float32   # float64: cell indices (chunk_cells)
    wt = np.zeros((g, T, S, cout_g, tp.channels_per_tile, kh, kw), dtype)
    for gi in range(g):
        rows = slice(gi * cout_g, (gi + 1) * cout_g)
        for t in range(T):
            for j, c in enumerate(tp.tile_channels[t]):
                if c >= 0:
                    wt[gi, t, :, :, j] = slices[:, rows, c] * tp.mask[t, j]
    return wt.reshape(g * T * S * cout_g, tp.channels_per_tile, kh, kw)


@dataclass(frozen=True)
class ChunkArrays:
    """What one chunk (t0, t1, s0, s1) of a layer's columns computes, as arrays: the emitter
    writes these into the IR and training gathers and convolves with the same ones.

    * ``gather``: input channels the chunk's tiles read, in order (local channel c of group
      gi is gi*cin_g + c; a padding slot reads channel Cin, an appended zero channel), or
      None when that is every channel in order;
    * ``weight``: (G*(t1-t0)*(s1-s0)*cout_g, width, kh, kw) cells, a grouped convolution with
      ``groups`` = G*(t1-t0) over the gathered channels;
    * ``columns``: the chunk's global column indices (group, tile, slice, out_channel);
    * ``coef``: (planes, s1-s0) recombination weight of each (plane, slice);
    * ``recombine``: False when the array columns already are the output channels."""
    gather: np.ndarray | None
    zero_channel: bool
    weight: np.ndarray
    groups: int
    columns: np.ndarray
    coef: np.ndarray
    recombine: bool


def chunk_arrays(p: LayerPlan, chunk, weights: np.ndarray | None = None) -> ChunkArrays:
    """The :class:`ChunkArrays` of chunk (t0, t1, s0, s1) of a tiled layer (``weights``: the
    layer's ``array_weights`` when the caller already has them)."""
    t0, t1, s0, s1 = chunk
    tp, sp = p.tiling, p.slicing
    g, T, cin_g, cout_g = p.group, tp.tiles_per_group, p.cin_g, p.cout_g
    P, S = p.n_planes, p.n_slices
    kh, kw = p.kernel
    cin = g * cin_g
    if weights is None:
        weights = array_weights(p)
    weights = weights.reshape(g, T, S, cout_g, tp.channels_per_tile, kh, kw)
    width = chunk_width(p, t0, t1)
    idx = np.array([[gi * cin_g + c if c >= 0 else cin for c in tp.tile_channels[t][:width]]
                    for gi in range(g) for t in range(t0, t1)], np.int64).reshape(-1)
    gather = None if np.array_equal(idx, np.arange(cin)) else idx
    coef = np.ones((P, S), np.float32) if sp is None else np.outer(sp.plane_coef, sp.slice_coef).astype(np.float32)
    c = np.ascontiguousarray(coef[:, s0:s1])
    return ChunkArrays(gather=gather, zero_channel=gather is not None and bool(np.any(idx == cin)),
                       weight=np.ascontiguousarray(weights[:, t0:t1, s0:s1, :, :width].reshape(-1, width, kh, kw)),
                       groups=g * (t1 - t0), columns=chunk_columns(p, chunk), coef=c,
                       recombine=not (P == 1 and (s1 - s0) == 1 and (t1 - t0) == 1 and c[0, 0] == 1))


def plan_from_mapping(L: LayerMapping) -> LayerPlan:
    """The plan of a compiled layer (its ``LayerMapping``) that the planning rules above read:
    shapes, tiling (recomputed with ``plan_tiles`` and checked against the record), slice
    coefficients and chunks; no weight values (zeros) and no graph tensors."""
    kh, kw = L.kernel
    p = LayerPlan(name=L.name, op_type=L.op_type, kind=L.kind, x=None, y=None,
                  weight=np.zeros((L.cout, L.cin_per_group, kh, kw), np.float32), bias=None, group=L.group,
                  strides=list(L.strides), pads=list(L.pads), dilations=list(L.dilations), auto_pad=L.auto_pad)
    if L.tiling is not None:
        tr = L.tiling
        p.tiling = plan_tiles(p, tr.array_rows, tr.array_cols, tr.mode)
        if p.tiling.tile_channels.tolist() != tr.tile_channels or p.tiling.rows_used != list(tr.rows_used):
            raise PimcError(f"layer '{L.name}': its recorded tiling differs from what this pimc plans for it; "
                            f"recompile the source model with this pimc")
    if L.slicing is not None:
        sr = L.slicing
        p.slicing = SlicePlan(planes=sr.planes, plane_coef=np.asarray(sr.plane_coef, np.float32),
                              input_slice_range=tuple(sr.input_slice_range), weight_slices=list(sr.weight_slices),
                              slice_coef=np.asarray(sr.slice_coef, np.float32), cell_range=tuple(sr.cell_range),
                              weights=np.zeros((len(sr.weight_slices), *p.weight.shape), np.float32),
                              bit_serial=sr.bit_serial)
    if L.chunks:
        p.chunks = [(c.tiles[0], c.tiles[1], c.slices[0], c.slices[1]) for c in L.chunks]
    return p


def chunk_cells(p: LayerPlan) -> list[ChunkArrays]:
    """Per chunk (``layer_chunks``), its :class:`ChunkArrays` with ``weight`` holding, in place of
    each cell's value, the flat index of that cell in the layer's weight slices
    (S, Cout, cin_g, kh, kw) in C order, -1 where the cell is zero (a padding slot, a kernel row
    held by another tile): the same index rules as ``chunk_arrays``, so that training gathers its
    array weights from its slices exactly as the emitter places them."""
    S = p.n_slices
    shape = (S, *p.weight.shape)
    index = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float64).reshape(shape)
    q = dataclasses.replace(p, slicing=dataclasses.replace(p.slicing, weights=index) if p.slicing else None,
                            weight_quant=WeightQuant(bits=0, q=index[0], scale=np.ones(p.cout, np.float32)))
    w = array_weights(q)
    out = []
    for chunk in layer_chunks(q):
        ca = chunk_arrays(q, chunk, w)
        out.append(dataclasses.replace(ca, weight=ca.weight.astype(np.int64) - 1))
    return out


def full_range(p: LayerPlan) -> tuple[np.ndarray, np.ndarray]:
    w = array_weights(p).reshape(p.n_columns, -1).astype(np.float64)
    lo, hi = p.slicing.input_slice_range
    pos, neg = np.clip(w, 0, None), np.clip(w, None, 0)
    s_max = (pos * hi + neg * lo).sum(1)
    s_min = (pos * lo + neg * hi).sum(1)
    return s_min, s_max
