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

import numpy as np

from pimc.core.formulas import input_range, plane_weights
from pimc.core.mapping import SlicePlan
from pimc.core.planning import plan_chunks, plan_slices
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class SplitSlices(Transformation):
    name = "split_slices"
    exact = True

    def apply(self, model: PimModel):
        changed = False
        for p in model.layers.values():
            cfg = model.layer_config(p.name)
            if not cfg.pim:
                continue
            changed = True
            iq = p.input_quant
            names, coef, cell_range, w = plan_slices(p.weight_quant.bits, cfg.cell_bits, cfg.differential_weights,
                                                     p.weight_quant.q)
            assert np.array_equal((w * coef.reshape(-1, 1, 1, 1, 1)).sum(0), p.weight_quant.q)
            if cfg.bit_serial_inputs:
                planes, pcoef, rng = iq.bits, plane_weights(iq.bits, int(iq.signed)), (0.0, 1.0)
            else:
                planes, pcoef, rng = 1, np.ones(1, np.float32), input_range(iq.bits, int(iq.signed))
            p.slicing = SlicePlan(planes=planes, plane_coef=pcoef, input_slice_range=rng, weight_slices=names,
                                  slice_coef=coef, cell_range=cell_range, weights=w,
                                  bit_serial=cfg.bit_serial_inputs)
            p.chunks = plan_chunks(p, cfg.chunk_mib)
            emit_layer(model.graph, p)
        return model, changed
