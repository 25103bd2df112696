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

from pimc.core.planning import plan_tiles
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class TileCrossbars(Transformation):
    name = "tile_crossbars"
    exact = True

    def apply(self, model: PimModel):
        changed = False
        for p in model.layers.values():
            cfg = model.layer_config(p.name)
            if not cfg.pim:
                continue   # a digital or float layer (per-layer rule)
            p.tiling = plan_tiles(p, cfg.array_rows, cfg.array_cols, cfg.tile_mode)
            emit_layer(model.graph, p)
            changed = True
        return model, changed
