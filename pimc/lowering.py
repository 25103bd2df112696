"""Emit a crossbar layer's ONNX nodes from its :class:`~pimc.core.mapping.LayerPlan`.

The passes decide (fill in the plan); this module only writes what the plan
says, at whatever stage the plan is:

* float:         ``Conv(x, W, b)`` (+ kept BN affine)
* A-quantized:   ``QuantizeInput`` -> ``Mul(s_x)`` -> float Conv
* digital:       ``QuantizeInput`` -> ``Conv(q_x, q_w)`` -> ``Mul(out_scale)`` -> ``Add(out_bias)``
* tiled:         ... -> ``Pad``/``Gather`` (tile channels) -> ``Conv(group=G*T)``
                 -> ``Reshape`` -> ``ReduceSum`` (over tiles) -> ...
* sliced:        ``BitPlanes`` before the gather, slice weights in the conv,
                 ``Mul(coef)`` before the ``ReduceSum`` over planes, tiles, slices
* with ADC:      ``AdcQuantize`` between the array conv and the recombination

"fc" layers (Gemm, MatMul) are the 1x1-conv case: their input is reshaped to
(-1, K, 1, 1) first and back to (..., N) at the end.
The integer accumulator before ``Mul(out_scale)`` holds integer values exactly
(float32, |acc| < 2^24) in every stage without an ADC, so the digital, tiled
and sliced stages produce bit-identical outputs.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .core import names as N
from .core.names import DOMAIN
from .core.mapping import LayerPlan
from .core.planning import array_weights, chunk_arrays, layer_chunks, output_affine


class _Emitter:
    def __init__(self, plan: LayerPlan):
        self.plan = plan
        self.nodes: list[gs.Node] = []

    def const(self, role: str, value, suffix: str = "") -> gs.Constant:
        return gs.Constant(N.tensor(self.plan.name, role, suffix), np.ascontiguousarray(value))

    def op(self, op: str, inputs, role: str, attrs=None, domain: str | None = None, out=None,
           suffix: str = "") -> gs.Variable:
        y = out if out is not None else gs.Variable(N.output(self.plan.name, role, suffix))
        node = gs.Node(op=op, name=N.node(self.plan.name, role, suffix), inputs=list(inputs), outputs=[y],
                       attrs=dict(attrs or {}))
        if domain:
            node.domain = domain
        self.nodes.append(node)
        return y

    def conv_attrs(self, group: int) -> dict:
        return conv_attributes(self.plan, group)


def conv_attributes(p: LayerPlan, group: int) -> dict:
    """The Conv attributes of layer ``p``'s convolutions (its kernel, strides, pads, dilations)
    with ``group`` groups."""
    kh, kw = p.kernel
    a = {"kernel_shape": [kh, kw], "strides": list(p.strides), "dilations": list(p.dilations), "group": int(group)}
    if p.auto_pad and p.auto_pad != "NOTSET":
        a["auto_pad"] = p.auto_pad
    else:
        a["pads"] = list(p.pads)
    return a


def float_affine(plan: LayerPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-column (scale, shift) applied after the float MACs: kept BN and bias."""
    s, t = plan.bn_output if plan.bn_output is not None else (np.ones(plan.cout, np.float32), None)
    return output_affine(1.0, np.ones(plan.cout, np.float32), s, plan.bias, t)


def emit_layer(graph: gs.Graph, plan: LayerPlan) -> None:
    """Replace the layer's current nodes in ``graph`` by those its plan describes."""
    for n in plan.nodes:
        n.inputs.clear()
        n.outputs.clear()
    old = set(id(n) for n in plan.nodes)
    graph.nodes = [n for n in graph.nodes if id(n) not in old]
    em = _Emitter(plan)
    _build(em, plan)
    graph.nodes.extend(em.nodes)
    plan.nodes = em.nodes


def _build(em: _Emitter, p: LayerPlan) -> None:
    x = p.x
    if p.kind == "fc":
        k = p.rows_per_column
        x = em.op("Reshape", [x, em.const("in_shape", np.array([-1, k, 1, 1], np.int64))], "to_4d")
    final = p.y if p.kind == "conv" else None
    scale, shift = float_affine(p)

    if p.input_quant is None or p.weight_quant is None:
        h = x
        if p.input_quant is not None:
            iq = p.input_quant
            q = em.op("QuantizeInput", [x, em.const("in_scale", np.float32(iq.scale))], N.QUANTIZE_INPUT,
                      {"bits": iq.bits, "signed": int(iq.signed)}, DOMAIN)
            h = em.op("Mul", [q, em.const("in_scale_deq", np.float32(iq.scale))], "x_fakequant")
        need_affine = p.bn_output is not None
        ins = [h, em.const("weight", p.weight.astype(np.float32))]
        if not need_affine and p.bias is not None:
            ins.append(em.const("bias", p.bias.astype(np.float32)))
        y = em.op("Conv", ins, "conv", em.conv_attrs(p.group), out=None if need_affine else final)
        if need_affine:
            y = em.op("Mul", [y, em.const("bn_scale", scale.reshape(1, -1, 1, 1))], "bn_mul")
            y = em.op("Add", [y, em.const("bn_shift", shift.reshape(1, -1, 1, 1))], "bn_add", out=final)
    else:
        iq, wq = p.input_quant, p.weight_quant
        q = em.op("QuantizeInput", [x, em.const("in_scale", np.float32(iq.scale))], N.QUANTIZE_INPUT,
                  {"bits": iq.bits, "signed": int(iq.signed)}, DOMAIN)
        acc = _integer_core(em, p, q)
        out_scale, _ = output_affine(iq.scale, wq.scale, scale, None, None, p.output_rescale)
        # a kept BatchNorm always gets its Add, so that calibrate-bn can rewrite the shift
        has_shift = shift is not None and (p.bn_stats is not None or bool(np.any(shift != 0)))
        y = em.op("Mul", [acc, em.const(N.OUT_SCALE, out_scale.reshape(1, -1, 1, 1))], N.DEQUANTIZE,
                  out=None if has_shift else final)
        if has_shift:
            y = em.op("Add", [y, em.const(N.OUT_BIAS, shift.reshape(1, -1, 1, 1))], N.BIAS, out=final)

    if p.kind == "fc":
        lead = em.op("Shape", [p.x], "lead_shape", {"start": 0, "end": -1})
        shape = em.op("Concat", [lead, em.const("n_out", np.array([p.cout], np.int64))], "out_shape", {"axis": 0})
        em.op("Reshape", [y, shape], "to_nd", out=p.y)


def _integer_core(em: _Emitter, p: LayerPlan, q: gs.Variable) -> gs.Variable:
    """Integer accumulator (B, Cout, H, W) from integer inputs ``q``."""
    wq = p.weight_quant
    if p.tiling is None:
        return em.op("Conv", [q, em.const("weight_q", wq.q.astype(np.float32))], "mac", em.conv_attrs(p.group))

    sp = p.slicing
    P = p.n_planes
    h = q
    if sp is not None and sp.bit_serial:
        iq = p.input_quant
        h = em.op("BitPlanes", [h], "planes", {"bits": iq.bits, "signed": int(iq.signed)}, DOMAIN)
    weights = array_weights(p)
    chunks = layer_chunks(p)
    padded = None
    parts = []
    for ci, chunk in enumerate(chunks):
        sfx = N.chunk_suffix(ci, len(chunks))
        ca = chunk_arrays(p, chunk, weights)
        hin = h
        if ca.gather is not None:
            src = h
            if ca.zero_channel:
                if padded is None:
                    padded = em.op("Pad", [h, em.const("pad_channel", np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64))],
                                   "pad_channel")
                src = padded
            hin = em.op("Gather", [src, em.const("tile_channels", ca.gather, sfx)], "tile_gather", {"axis": 1},
                        suffix=sfx)
        a = em.op(N.ARRAY_MAC_OP, [hin, em.const(N.ARRAY_WEIGHT, ca.weight, sfx)], N.ARRAY_MAC,
                  em.conv_attrs(ca.groups), suffix=sfx)
        t0, t1, s0, s1 = chunk
        rattrs = {"planes": P, "groups": p.group, "tiles": t1 - t0, "slices": s1 - s0}
        if p.adc is not None:
            cols = ca.columns
            adc_in = [a, em.const(N.ADC_SCALE, p.adc.step[cols].astype(np.float32).reshape(1, -1, 1, 1), sfx),
                      em.const(N.ADC_ZERO_POINT, p.adc.zero_point[cols].astype(np.float32).reshape(1, -1, 1, 1), sfx)]
            if ca.recombine:   # conversion and recombination fused: the partial sums are read once
                parts.append(em.op("AdcRecombine", adc_in + [em.const("recombine_coef", ca.coef, sfx)],
                                   N.ADC, {"bits": p.adc.bits, **rattrs}, DOMAIN, suffix=sfx))
                continue
            a = em.op("AdcQuantize", adc_in, N.ADC, {"bits": p.adc.bits}, DOMAIN, suffix=sfx)
        if ca.recombine:
            parts.append(em.op("Recombine", [a, em.const("recombine_coef", ca.coef, sfx)],
                               "recombine", rattrs, DOMAIN, suffix=sfx))
        else:
            parts.append(a)   # one column per output channel already
    if len(parts) == 1:
        return parts[0]
    return em.op("Sum", parts, N.SUM_CHUNKS)


