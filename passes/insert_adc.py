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
* ``calibrated``: a range of the column's partial sums over the calibration
  data (computed with all layers digital, i.e. before any ADC), by
  ``config.adc_calib`` (``pimc.core.calibrators``: ``max`` = the exact min/max,
  ``percentile:P``, ``mse``, ``entropy`` from a streaming per-column histogram of
  every k-th row and column of the partial-sum maps, about ADC_POSITIONS positions
  per map and plane, of the first samples giving ADC_SAMPLES per column:
  ``calibrate_sampled`` computes only those partial sums), widened to include 0.

A layer of a frozen plan (``compile_model(plan=...)``, ``--plan``) keeps the given
Delta and z per column instead (range ``frozen``: the span they cover at this
bit width); a count that does not match the layer's columns is an error.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from pimc.calibration import calibration_inputs, stream_probes, strided_probe
from pimc.core.calibrators import Histograms, adc_ranges, parse_method, subsample_step
from pimc.core import names as N
from pimc.core.mapping import AdcPlan
from pimc.core.errors import PimcError
from pimc.core.planning import adc_params, chunk_columns, frozen_range, full_range, layer_chunks
from pimc.lowering import conv_attributes, emit_layer
from pimc.model import PimModel
from .base import Transformation


# The histogram methods read, per ADC column, the partial sums at about ADC_POSITIONS output
# positions of each map (every k-th row and column, k >= 1) and plane, of the first
# calibration samples that give at least ADC_SAMPLES of them: enough for the MSE and entropy
# searches, and the cost stops growing with the number of calibration samples
ADC_POSITIONS = 16
ADC_SAMPLES = 4096
ADC_BINS = 256      # histogram bins per ADC column (integer partial sums: exact while |s| < 128)


class InsertAdc(Transformation):
    name = "insert_adc"

    def apply(self, model: PimModel):
        layers = [p for p in model.layers.values() if model.layer_config(p.name).pim]
        for p in layers:
            fz = model.frozen_layer(p.name)
            if fz.adc_step is not None and fz.adc_step.shape != (p.n_columns,):
                raise PimcError(f"--plan: layer '{p.name}': adc_step has {fz.adc_step.size} values, the layer has "
                                f"{p.n_columns} array columns with this scheme and tiling")
        methods = {p.name: parse_method(model.layer_config(p.name).adc_calib, "--adc-calib") for p in layers}
        todo = [p for p in layers if model.frozen_layer(p.name).adc_step is None
                and model.layer_config(p.name).adc_range == "calibrated"]
        bits = {p.name: model.layer_config(p.name).adc_bits for p in todo}
        ranges = {}
        if todo and all(methods[p.name].needs_histogram for p in todo) and model.opset >= 10:
            ranges = calibrate_sampled(model, todo, methods, bits)
        elif todo:
            ranges = calibrate_ranges(model, todo, methods, bits)
        for p in layers:
            cfg = model.layer_config(p.name)
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
                            s_min=s_min.astype(np.float32), s_max=s_max.astype(np.float32),
                            calibration=str(methods[p.name]) if p.name in ranges else None)
            emit_layer(model.graph, p)
        return model, bool(layers)


def calibrate_sampled(model: PimModel, plans, methods: dict, bits: dict) -> dict:
    """As :func:`calibrate_ranges` for layers whose methods all read histograms, computing only
    the sampled partial sums: in the probe model every layer's integer accumulator is its
    digital convolution (one MAC per weight; equal to the sum of its array partial sums), and
    each array convolution runs once more with its strides multiplied by the sampling step k,
    which gives exactly the partial sums at every k-th output row and column (conv output
    position i*k reads the inputs stride*k*i - pad, ...).  The cost of the scheme's MAC
    expansion is divided by k^2.  Layers with auto_pad (whose padding depends on the output
    size) and fc layers are read whole."""
    keys = [(p, ci, chunk) for p in plans for ci, chunk in enumerate(layer_chunks(p))]
    n = len(next(iter(calibration_inputs(model).values())))

    def probes(proto: onnx.ModelProto):
        g = proto.graph
        nodes = {n.name: n for n in g.node}
        names = []
        for p in plans:
            deq = nodes[N.node(p.name, N.DEQUANTIZE)]
            w = N.probe(p.name, "weight_q")
            g.initializer.append(numpy_helper.from_array(p.weight_quant.q.astype(np.float32), w))
            acc = N.probe(p.name, "acc")
            g.node.append(onnx.helper.make_node("Conv", [N.output(p.name, N.QUANTIZE_INPUT), w], [acc],
                                                name=N.probe(p.name, "digital"), **conv_attributes(p, p.group)))
            deq.input[0] = acc
        for i, (p, ci, chunk) in enumerate(keys):
            mac = nodes[N.node(p.name, N.ARRAY_MAC, N.chunk_suffix(ci, len(layer_chunks(p))))]
            k = sample_step(p)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mac.attribute}
            attrs["strides"] = [s * k for s in attrs.get("strides", [1, 1])]
            o = N.probe(i, "sample")
            g.node.append(onnx.helper.make_node(mac.op_type, list(mac.input), [o], name=o, **attrs))
            names.append(o)
        return names

    hs = [Histograms(len(chunk_columns(p, chunk)), bins=ADC_BINS, integer=True) for p, _, chunk in keys]

    def on_batch(res):
        for h, x in zip(hs, res):
            h.update(x, axis=1)
    m = histogram_samples(plans, n)
    stream_probes(model, probes, on_batch, batch=calibration_batch(plans, sampled=True), prune=True, rows=m)
    out = {p.name: (np.zeros(p.n_columns), np.zeros(p.n_columns)) for p in plans}
    for h, (p, _, chunk) in zip(hs, keys):
        cols = chunk_columns(p, chunk)
        out[p.name][0][cols], out[p.name][1][cols] = adc_ranges(h, methods[p.name], bits[p.name])
    return out


def sample_step(p) -> int:
    """The step k of the output rows and columns the ADC histograms of layer ``p`` read (about
    ADC_POSITIONS positions per map; 1 for fc layers and auto_pad)."""
    sp = p.out_spatial() if p.kind == "conv" else None
    if sp is None or (p.auto_pad and p.auto_pad != "NOTSET"):
        return 1
    return subsample_step(int(sp[0]) * int(sp[1]), ADC_POSITIONS)


def sampled_positions(p) -> int:
    """Output positions per map the ADC histograms of layer ``p`` read (every ``sample_step``-th
    row and column; 1 for fc layers)."""
    sp = p.out_spatial() if p.kind == "conv" else None
    if not sp:
        return 1
    k = sample_step(p)
    return (-(-sp[0] // k)) * (-(-sp[1] // k))


def histogram_samples(plans, n: int) -> int:
    """How many of the ``n`` calibration samples the ADC histograms read: the fewest that give
    every column about ADC_SAMPLES partial sums (planes x positions per sample)."""
    least = min((p.n_planes * sampled_positions(p) for p in plans), default=1)
    return int(min(n, max(1, -(-ADC_SAMPLES // least))))


def calibrate_ranges(model: PimModel, plans, methods: dict, bits: dict) -> dict:
    """Layer name -> (s_min, s_max) per column, from one streamed run over the calibration
    data: exact per-column extremes (in-graph ReduceMin/ReduceMax), and for the layers whose
    method (``methods[name]``) needs one, a per-column histogram of a strided sample of the
    partial sums; ``bits[name]``: the layer's ADC bits."""
    keys = [(p, ci, chunk) for p in plans for ci, chunk in enumerate(layer_chunks(p))]
    wants = [methods[p.name].needs_histogram for p, _, _ in keys]

    def probes(proto: onnx.ModelProto):
        names = []
        axes = onnx.helper.make_tensor(N.probe("axes"), onnx.TensorProto.INT64, [3], [0, 2, 3])
        proto.graph.initializer.append(axes)
        for i, (p, ci, chunk) in enumerate(keys):
            src = N.output(p.name, N.ARRAY_MAC, N.chunk_suffix(ci, len(layer_chunks(p))))
            for op in ("ReduceMin", "ReduceMax"):
                o = N.probe(i, op)
                if model.opset >= 18:
                    proto.graph.node.append(onnx.helper.make_node(op, [src, N.probe("axes")], [o], keepdims=0))
                else:
                    proto.graph.node.append(onnx.helper.make_node(op, [src], [o], keepdims=0, axes=[0, 2, 3]))
                names.append(o)
            if wants[i]:
                names.append(strided_probe(proto, src, N.probe(i, "sample"), model.opset, sample_step(p)))
        return names

    at = np.cumsum([0] + [3 if w else 2 for w in wants])
    lo = [None] * len(keys)
    hi = [None] * len(keys)
    hs = [Histograms(len(chunk_columns(p, chunk)), bins=ADC_BINS, integer=True) if w else None
          for (p, _, chunk), w in zip(keys, wants)]

    def on_batch(res):
        for i in range(len(keys)):
            a, b = res[at[i]], res[at[i] + 1]
            lo[i] = a if lo[i] is None else np.minimum(lo[i], a)
            hi[i] = b if hi[i] is None else np.maximum(hi[i], b)
            if wants[i]:
                hs[i].update(res[at[i] + 2], axis=1)
    stream_probes(model, probes, on_batch, batch=calibration_batch(plans))
    out = {p.name: (np.zeros(p.n_columns), np.zeros(p.n_columns)) for p in plans}
    for i, (p, _, chunk) in enumerate(keys):
        cols = chunk_columns(p, chunk)
        if wants[i]:   # the histogram methods see the sample (as calibrate_sampled: the same ranges)
            c_lo, c_hi = adc_ranges(hs[i], methods[p.name], bits[p.name])
        else:
            c_lo, c_hi = np.minimum(lo[i], 0), np.maximum(hi[i], 0)
        out[p.name][0][cols] = c_lo
        out[p.name][1][cols] = c_hi
    return out


def calibration_batch(plans, sampled: bool = False, budget_mib: int = 64) -> int:
    """Calibration batch whose array partial sums (the largest layer's, all planes; every k-th
    row and column when ``sampled``) stay near ``budget_mib`` MiB of float32 (1..64)."""
    per_sample = 0
    total = 0
    for p in plans:
        sp = p.out_spatial() if p.kind == "conv" else None
        positions = int(np.prod(sp or [1, 1]))
        if sampled and sp:
            positions = sampled_positions(p)
            # the gathered bit planes the sampled array convolutions read, whole maps
            per_sample = max(per_sample, p.n_planes * p.tiling.tiles_per_group * p.tiling.channels_per_tile
                             * p.group * int(np.prod(p.in_spatial or [1, 1])))
        per_sample = max(per_sample, p.n_planes * p.n_columns * positions)
        total += p.n_planes * p.n_columns * positions
    if sampled:   # every layer's sampled partial sums come back from one run
        per_sample = max(per_sample, total)
    return int(min(64, max(1, budget_mib * 2 ** 20 // max(4 * per_sample, 1))))
