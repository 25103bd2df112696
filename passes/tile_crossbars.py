"""Tile each crossbar layer's weight matrix onto arrays of R rows x C columns.

Accepts: a model after QuantizeWeights.
Guarantees: every crossbar layer gets a TilePlan and is re-emitted so that
each (group, tile) is one group of a grouped Conv whose output channels are the
true per-array partial sums, summed over tiles afterwards.  The weight rows of
one output column (K = Cin/groups * kh * kw, ordered channel, kh, kw) are split:

* ``channel`` mode: whole kernels per array, floor(R / (kh*kw)) input channels
  per tile (the last tile may hold fewer);
* ``row`` mode: exactly R consecutive rows per tile; a kernel may straddle two
  arrays (each tile then reads the channels it touches, masked to its rows).

Exact: the model's outputs do not change by a single bit (integer partial sums
are exact in float32).  Raises PimcError when a kernel does not fit an array
in channel mode.
"""
from __future__ import annotations

import math

import numpy as np

from pimc.errors import PimcError
from pimc.lowering import emit_layer
from pimc.mapping import LayerPlan, TilePlan
from pimc.model import PimModel
from .base import Transformation


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
    return TilePlan(mode=mode, rows=rows, cols=cols, tiles=T, width=m, channel=channel, mask=mask,
                    rows_used=rows_used)


class TileCrossbars(Transformation):
    name = "tile_crossbars"
    exact = True

    def apply(self, model: PimModel):
        cfg = model.config
        for p in model.layers.values():
            p.tiling = plan_tiles(p, cfg.array_rows, cfg.array_cols, cfg.tile_mode)
            emit_layer(model.graph, p)
        return model, bool(model.layers)
