"""Insert a PIM-quantize (ADC) op on every array column.

Accepts: a model after SplitSlices.
Guarantees: every crossbar layer gets an AdcPlan and an ``AdcQuantize`` node
between its array MACs and the recombination, with one step Delta and one
integer zero point z per array column (group, tile, slice, output channel):

    Delta = max(1, (s_max - s_min) / (2^b - 1)),   z = round(-s_min / Delta)

so that an ADC with 2^b >= s_max - s_min + 1 levels is lossless (Delta = 1:
the PIM model then equals the digital quantized model exactly).  The range
[s_min, s_max] is, by ``config.adc_range``:

* ``full``: the worst case of the column's partial sum over all inputs in the
  input slice range (never clips);
* ``calibrated``: min/max of the column's partial sums over the calibration
  data (computed with all layers digital, i.e. before any ADC), widened to
  include 0.
"""
from __future__ import annotations

import numpy as np
import onnx

from pimc.calibration import run_with_probes
from pimc.core import names as N
from pimc.core.mapping import AdcPlan
from pimc.core.planning import adc_params, chunk_columns, full_range, tile_classes
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class InsertAdc(Transformation):
    name = "insert_adc"

    def apply(self, model: PimModel):
        cfg = model.config
        plans = list(model.layers.values())
        ranges = {}
        if cfg.adc_range == "calibrated" and plans:
            def probes(proto: onnx.ModelProto):
                names = []
                axes = onnx.helper.make_tensor(N.probe("axes"), onnx.TensorProto.INT64, [3], [0, 2, 3])
                proto.graph.initializer.append(axes)
                for i, p in enumerate(plans):
                    chunks = p.chunks or tile_classes(p, 0, p.n_slices)
                    for ci in range(len(chunks)):
                        src = N.output(p.name, N.ARRAY_MAC, N.chunk_suffix(ci, len(chunks)))
                        for op in ("ReduceMin", "ReduceMax"):
                            o = N.probe(i, ci, op)
                            if model.opset >= 18:
                                proto.graph.node.append(onnx.helper.make_node(op, [src, N.probe("axes")], [o], keepdims=0))
                            else:
                                proto.graph.node.append(onnx.helper.make_node(op, [src], [o], keepdims=0, axes=[0, 2, 3]))
                            names.append(o)
                return names
            res = iter(run_with_probes(model, probes))
            for p in plans:
                lo = np.zeros(p.n_columns)
                hi = np.zeros(p.n_columns)
                for chunk in p.chunks or tile_classes(p, 0, p.n_slices):
                    cols = chunk_columns(p, chunk)
                    lo[cols] = np.min(np.stack(next(res)), axis=0)
                    hi[cols] = np.max(np.stack(next(res)), axis=0)
                ranges[p.name] = (np.minimum(lo, 0), np.maximum(hi, 0))
        for p in plans:
            s_min, s_max = ranges.get(p.name) or full_range(p)
            delta, z = adc_params(s_min, s_max, cfg.adc_bits)
            p.adc = AdcPlan(bits=cfg.adc_bits, range=cfg.adc_range, scale=delta, zero_point=z,
                            s_min=s_min.astype(np.float32), s_max=s_max.astype(np.float32))
            emit_layer(model.graph, p)
        return model, bool(plans)
