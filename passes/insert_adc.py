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

A layer of a frozen plan (``compile_model(plan=...)``, ``--plan``) keeps the given
Delta and z per column instead (range ``frozen``: the span they cover at this
bit width); a count that does not match the layer's columns is an error.
"""
from __future__ import annotations

import numpy as np
import onnx

from pimc.calibration import run_with_probes
from pimc.core import names as N
from pimc.core.mapping import AdcPlan
from pimc.core.errors import PimcError
from pimc.core.planning import adc_params, chunk_columns, frozen_range, full_range, layer_chunks
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class InsertAdc(Transformation):
    name = "insert_adc"

    def apply(self, model: PimModel):
        cfg = model.config
        for p in model.layers.values():
            fz = model.frozen_layer(p.name)
            if fz.adc_step is not None and fz.adc_step.shape != (p.n_columns,):
                raise PimcError(f"--plan: layer '{p.name}': adc_step has {fz.adc_step.size} values, the layer has "
                                f"{p.n_columns} array columns with this scheme and tiling")
        plans = [p for p in model.layers.values() if model.frozen_layer(p.name).adc_step is None]   # to calibrate
        ranges = {}
        if cfg.adc_range == "calibrated" and plans:
            def probes(proto: onnx.ModelProto):
                names = []
                axes = onnx.helper.make_tensor(N.probe("axes"), onnx.TensorProto.INT64, [3], [0, 2, 3])
                proto.graph.initializer.append(axes)
                for i, p in enumerate(plans):
                    chunks = layer_chunks(p)
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
                for chunk in layer_chunks(p):
                    cols = chunk_columns(p, chunk)
                    lo[cols] = np.min(np.stack(next(res)), axis=0)
                    hi[cols] = np.max(np.stack(next(res)), axis=0)
                ranges[p.name] = (np.minimum(lo, 0), np.maximum(hi, 0))
        for p in model.layers.values():
            fz = model.frozen_layer(p.name)
            if fz.adc_step is not None:   # as given: the range the step and zero point span
                delta, z = fz.adc_step, fz.adc_zero_point
                s_min, s_max = frozen_range(delta, z, cfg.adc_bits)
                p.adc = AdcPlan(bits=cfg.adc_bits, range="frozen", step=delta, zero_point=z, s_min=s_min, s_max=s_max)
                emit_layer(model.graph, p)
                continue
            s_min, s_max = ranges.get(p.name) or full_range(p)
            delta, z = adc_params(s_min, s_max, cfg.adc_bits)
            p.adc = AdcPlan(bits=cfg.adc_bits, range=cfg.adc_range, step=delta, zero_point=z,
                            s_min=s_min.astype(np.float32), s_max=s_max.astype(np.float32))
            emit_layer(model.graph, p)
        return model, bool(model.layers)
