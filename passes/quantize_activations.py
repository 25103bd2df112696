"""Quantize each crossbar layer's input activations.

Accepts: a model after FoldBatchNorm.
Guarantees: every crossbar layer gets an InputQuant (scale, bits, signed) and
is re-emitted with ``QuantizeInput`` + dequantizing ``Mul`` in front of its
float MACs (a runnable fake-quant model).  The scale is, in order of preference:

0. frozen, given by the caller (``compile_model(plan=...)``, ``--plan``): used as given
   at ``input_bits``; the sign as given too, or else from the calibration range;
1. trained, read from the model: the layer input is produced by
   ``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)`` with a constant scalar
   scale; bits and sign follow the zero point's type (int8: signed 8-bit,
   uint8: unsigned 8-bit);
2. calibrated: a clipping range of the layer input over the calibration data, by
   ``config.act_calib`` (``pimc.core.calibrators``: ``max`` = the observed min/max,
   ``percentile:P``, ``mse``, ``entropy``; the histogram methods read every k-th row and
   column of each map (about 64 positions per map and sample), ``max`` every value).  Inputs that never go negative are
   unsigned, q in [0, 2^b-1], s = T/(2^b-1); others are signed two's-complement,
   q in [-2^(b-1), 2^(b-1)-1], s = T/(2^(b-1)-1), with T the range's bound.
Also records each layer's input spatial size seen in calibration.
"""
from __future__ import annotations

import numpy as np
import onnx

from pimc.calibration import stream_probes, strided_probe
from pimc.core.calibrators import Histograms, activation_ranges, parse_method, subsample_step
from pimc.core import names as N
from pimc.core.planning import input_scale
from pimc.lowering import emit_layer
from pimc.core.mapping import InputQuant
from pimc.model import PimModel
from .base import Transformation


def trained_input_scale(x) -> tuple[float, int, bool] | None:
    """(scale, bits, signed) of a QDQ pair producing ``x``, if any."""
    if len(x.inputs) != 1 or x.inputs[0].op != "DequantizeLinear":
        return None
    dq = x.inputs[0]
    qv = dq.inputs[0]
    if len(qv.inputs) != 1 or qv.inputs[0].op != "QuantizeLinear":
        return None
    q = qv.inputs[0]
    try:
        s_dq, s_q = (np.asarray(n.inputs[1].values) for n in (dq, q))
        zps = [np.asarray(n.inputs[2].values) for n in (dq, q) if len(n.inputs) > 2]
    except AttributeError:
        return None
    if s_dq.size != 1 or s_q.size != 1 or float(s_dq) != float(s_q) or any(np.any(z != 0) for z in zps):
        return None
    dtype = zps[0].dtype if zps else np.dtype(np.uint8)
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    return float(s_q), 8, dtype == np.dtype(np.int8)


class QuantizeActivations(Transformation):
    name = "quantize_activations"

    def apply(self, model: PimModel):
        plans = list(model.layers.values())
        bits_of = {p.name: model.layer_config(p.name).input_bits for p in plans}
        todo = []
        for p in plans:
            if not model.layer_config(p.name).quantized:
                continue   # a float layer (per-layer rule)
            bits = bits_of[p.name]
            fz = model.frozen_layer(p.name)
            tr = trained_input_scale(p.x)
            if fz.input_scale is not None and fz.input_signed is not None:
                p.input_quant = InputQuant(scale=fz.input_scale, bits=bits, signed=fz.input_signed, source="frozen")
            elif fz.input_scale is None and tr is not None:
                s, b, signed = tr
                p.input_quant = InputQuant(scale=s, bits=b, signed=signed, source="model")
            else:
                todo.append(p)
        methods = {p.name: parse_method(model.layer_config(p.name).act_calib, "--act-calib") for p in todo}
        hists = {}
        if todo or any(p.in_spatial is None and p.kind == "conv" for p in plans):
            def probes(proto: onnx.ModelProto):
                names = []
                for i, p in enumerate(todo):
                    for op in ("ReduceMin", "ReduceMax"):
                        o = N.probe(i, op)
                        proto.graph.node.append(onnx.helper.make_node(op, [p.x.name], [o], keepdims=0))
                        names.append(o)
                for i, p in enumerate(plans):
                    o = N.probe(i, "shape")
                    proto.graph.node.append(onnx.helper.make_node("Shape", [p.x.name], [o + "_i"]))
                    proto.graph.node.append(onnx.helper.make_node("Cast", [o + "_i"], [o], to=onnx.TensorProto.FLOAT))
                    names.append(o)
                for i, p in enumerate(todo):
                    if methods[p.name].needs_histogram:
                        sp = p.in_spatial if p.kind == "conv" and p.in_spatial and len(p.in_spatial) == 2 else None
                        k = subsample_step(int(sp[0]) * int(sp[1])) if sp else 1
                        names.append(strided_probe(proto, p.x.name, N.probe(i, "sample"), model.opset, k))
                return names
            lows, highs, shapes = [[] for _ in todo], [[] for _ in todo], [None] * len(plans)
            hists = {p.name: Histograms(1, bins=2048) for p in todo if methods[p.name].needs_histogram}

            def on_batch(res):
                for i, p in enumerate(todo):
                    lows[i].append(float(np.min(res[2 * i])))
                    highs[i].append(float(np.max(res[2 * i + 1])))
                for i in range(len(plans)):
                    shapes[i] = res[2 * len(todo) + i]
                at = 2 * len(todo) + len(plans)
                for p in todo:
                    if p.name in hists:
                        hists[p.name].update(res[at].reshape(1, -1))
                        at += 1
            stream_probes(model, probes, on_batch)
            for i, p in enumerate(todo):
                lo, hi = min(lows[i]), max(highs[i])
                c_lo, c_hi = lo, hi
                bits, method = bits_of[p.name], methods[p.name]
                if p.name in hists:
                    r_lo, r_hi = activation_ranges(hists[p.name], method, bits)   # from the sample
                    c_lo, c_hi = float(r_lo[0]), float(r_hi[0])
                scale, signed = input_scale(c_lo, c_hi, bits)
                source = model.calibration.get("source", "calibration")
                fz = model.frozen_layer(p.name)
                if fz.input_scale is not None:   # the sign from the data, the scale as given
                    scale, source = fz.input_scale, "frozen"
                p.input_quant = InputQuant(scale=scale, bits=bits, signed=signed, source=source,
                                           observed_min=lo, observed_max=hi,
                                           calibration=None if source == "frozen" else str(method))
            for i, p in enumerate(plans):
                shp = shapes[i].astype(int).tolist()
                if p.kind == "conv" and len(shp) == 4:
                    p.in_spatial = shp[2:]
        for p in plans:
            emit_layer(model.graph, p)
        return model, bool(plans)
