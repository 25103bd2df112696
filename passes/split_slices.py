"""Split inputs into bit planes and weights into differential / cell slices.

Accepts: a model after TileCrossbars.
Guarantees: every crossbar layer gets a SlicePlan and is re-emitted with:

* inputs: ``bit-serial`` schemes apply q_x one bit plane at a time
  (``BitPlanes``; planes stacked on the batch axis; plane p weighs 2^p, the MSB
  of a signed input -2^(b-1)); other schemes apply the multi-bit q_x at once;
* weights: ``differential`` schemes split q_w = q_w+ - q_w- into two
  non-negative column sets; others keep signed weights.  Each is further split
  into cells of ``cell_bits`` bits (0: one cell), recombined with 2^(c*j):
  unsigned c-bit chunks, the top chunk of a signed weight signed;
* recombination: ``Recombine`` sums over planes, tiles and slices with the
  (plane, slice) weights;
* chunks: when one layer's per-array partial sums would exceed
  ``config.chunk_mib`` MiB at batch 256, its (tile, slice) pairs are processed
  in chunks (each its own array conv, ADC and recombination, summed), which
  bounds the intermediate tensors; the sums stay exact.

Exact: outputs do not change by a single bit.
"""
from __future__ import annotations

import math

import numpy as np

from pimc.lowering import emit_layer, tile_classes
from pimc.mapping import SlicePlan
from pimc.model import PimModel
from pimc.core.formulas import input_range, plane_weights
from .base import Transformation


def split_unsigned(v: np.ndarray, bits: int, cell: int) -> list[np.ndarray]:
    """Non-negative integers of ``bits`` bits -> unsigned cells, LSB cell first."""
    n = math.ceil(bits / cell)
    return [np.floor(v / 2 ** (cell * j)) % (2 ** cell) for j in range(n)]


def split_signed(v: np.ndarray, bits: int, cell: int) -> list[np.ndarray]:
    """Signed integers of ``bits`` bits -> unsigned low cells and a signed top cell."""
    n = math.ceil(bits / cell)
    top_shift = 2 ** (cell * (n - 1))
    low = np.mod(v, top_shift)
    top = np.floor(v / top_shift)
    return split_unsigned(low, cell * (n - 1), cell)[: n - 1] + [top] if n > 1 else [v]


def plan_slices(bits_w: int, cell_bits: int, differential: bool, q: np.ndarray):
    if differential:
        mag = bits_w - 1
        c = cell_bits or mag
        pos = split_unsigned(np.maximum(q, 0), mag, c)
        neg = split_unsigned(np.maximum(-q, 0), mag, c)
        names = [f"pos.c{j}" for j in range(len(pos))] + [f"neg.c{j}" for j in range(len(neg))]
        coef = [2.0 ** (c * j) for j in range(len(pos))] + [-(2.0 ** (c * j)) for j in range(len(neg))]
        cell_range = (0, 2 ** c - 1)
        weights = pos + neg
    else:
        c = cell_bits or bits_w
        weights = split_signed(q, bits_w, c)
        names = [f"c{j}" for j in range(len(weights))]
        coef = [2.0 ** (c * j) for j in range(len(weights))]
        top_bits = bits_w - c * (len(weights) - 1)
        cell_range = (-(2 ** (top_bits - 1)), 2 ** c - 1 if len(weights) > 1 else 2 ** (top_bits - 1) - 1)
    return names, np.array(coef, np.float32), cell_range, np.stack(weights).astype(np.float32)


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


class SplitSlices(Transformation):
    name = "split_slices"
    exact = True

    def apply(self, model: PimModel):
        cfg = model.config
        for p in model.layers.values():
            iq = p.input_quant
            names, coef, cell_range, w = plan_slices(p.weight_quant.bits, cfg.cell_bits, cfg.differential_weights,
                                                     p.weight_quant.q)
            assert np.array_equal((w * coef.reshape(-1, 1, 1, 1, 1)).sum(0), p.weight_quant.q)
            if cfg.bit_serial_inputs:
                planes, pcoef, rng = iq.bits, plane_weights(iq.bits, int(iq.signed)), (0.0, 1.0)
            else:
                planes, pcoef, rng = 1, np.ones(1, np.float32), input_range(iq.bits, int(iq.signed))
            p.slicing = SlicePlan(planes=planes, plane_coef=pcoef, input_range=rng, slice_names=names,
                                  slice_coef=coef, cell_range=cell_range, weights=w,
                                  bit_serial=cfg.bit_serial_inputs)
            p.chunks = plan_chunks(p, cfg.chunk_mib)
            emit_layer(model.graph, p)
        return model, bool(model.layers)
