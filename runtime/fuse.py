"""The fused array op: a native session's rewrite of each array conv and its ADC.

Contract.  Accepts a compiled (final) PIM IR model, ideal or instantiated for a chip.
Guarantees: every layer chunk whose array conv (``Conv``, the mapping's ``array_mac``
node) feeds only its ``AdcRecombine`` / ``AdcRecombineNonIdeal`` node, whose inputs are
integers of at most 8 bits (the layer's ``input_quant.bits`` <= 8, or 1-bit planes) and
whose cell weights are integers in [-128, 127] (a chip's device variation makes them
non-integer: those chunks stay as they are), becomes one ``ConvAdcRecombine`` /
``ConvAdcRecombineNonIdeal`` node computing the same values (runtime/ops.py: its body
is the ops it replaces).  The tile-channel Gather in front of the conv (and the Pad that
appends its zero channel) goes into the fused node as its ``channels`` input, so the
kernel reads the layer input in place instead of a gathered copy.  Where every chunk of a layer fuses, the layer's own float ops around
them go in too: its ``QuantizeInput`` (when only the fused chunks read it: the kernel
quantizes the float input as it packs the bytes), the ``Sum`` of its chunks (a left fold:
chunk i adds its result to chunk i-1's, read as ``addend``) and its dequantization ``Mul``
and bias ``Add`` (per output channel, applied by the last chunk), then a residual ``Add`` of a
computed tensor of the output's shape (by onnx shape inference) and a ``Relu`` that follow, each
with the same float32 operations in the same order.  Everything else is untouched; the model's metadata is kept, so the
mapping still describes the layers.  The compiler never writes the fused op: the IR
on disk stays Conv + ADC, which any onnxruntime runs.

The layer mapping (``pimc.mapping``) is the only guide: no graph search.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pimc.core import names as N
from pimc.core.mapping import read_mapping

from .ops import DOMAIN, function_protos

FUSED = {"AdcRecombine": "ConvAdcRecombine", "AdcRecombineNonIdeal": "ConvAdcRecombineNonIdeal",
         "AdcQuantize": "ConvAdcRecombine", "AdcQuantizeNonIdeal": "ConvAdcRecombineNonIdeal"}
# A chunk without recombination (one plane, tile and slice) fuses as a recombination of one
# term with coefficient 1 (exact: float64(v) * 1 rounds back to v).
ONE = "pimc/fuse/coef_one"
# The epilogue inputs where a fused op has nothing to add, scale or quantize: x_scale 1
# (x / 1 = x), addend 0, out_scale 1, out_bias 0 (the recombination is never -0.0: unchanged).
SCALAR_ONE, SCALAR_ZERO = "pimc/fuse/one", "pimc/fuse/zero"
# no residual: -0.0, the one value that adds nothing to every float (y + -0.0 == y, -0.0 included)
SCALAR_NEG_ZERO = "pimc/fuse/neg_zero"


def _integer_bytes(w: np.ndarray) -> bool:
    return bool(np.all(w == np.round(w)) and w.min(initial=0) >= -128 and w.max(initial=0) <= 127)


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _gather_source(conv, producers, inits, readers) -> tuple[str, np.ndarray, list] | None:
    """Where the conv reads its tile channels: (the tensor gathered from, the channel of it that
    each conv input channel is, with the tensor's channel count meaning an appended zero
    channel; the nodes this replaces), when its input is the emitter's Gather (axis 1, constant
    indices) of the layer input, optionally after the Pad that appends one zero channel."""
    g = producers.get(conv.input[0])
    if g is None or g.op_type != "Gather" or g.domain not in ("", "ai.onnx") or readers[g.output[0]] != 1:
        return None
    if {a.name: helper.get_attribute_value(a) for a in g.attribute}.get("axis", 0) != 1 or g.input[1] not in inits:
        return None
    idx = numpy_helper.to_array(inits[g.input[1]]).astype(np.int64)
    src, replaced = g.input[0], [g]
    pad = producers.get(src)
    if pad is not None and pad.op_type == "Pad" and pad.domain in ("", "ai.onnx"):
        pads = numpy_helper.to_array(inits[pad.input[1]]) if len(pad.input) > 1 and pad.input[1] in inits else None
        mode = {a.name: helper.get_attribute_value(a) for a in pad.attribute}.get("mode", b"constant")
        zero = len(pad.input) < 3 or not pad.input[2]
        if pads is None or pads.tolist() != [0, 0, 0, 0, 0, 1, 0, 0] or mode not in (b"constant", "constant") or not zero:
            return None
        src = pad.input[0]
        replaced.append(pad)
    if idx.ndim != 1 or idx.min(initial=0) < -1:
        return None
    return src, idx, replaced


def fuse_array_ops(model: onnx.ModelProto, source: str = "model") -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with fused array ops, how many chunks were fused)."""
    if not any(p.key == "pimc.mapping" for p in model.metadata_props):
        return model, 0
    mapping = read_mapping(model, source)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    producers = _producers(model)
    consumers: dict[str, list] = {}   # tensor -> the nodes reading it
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    readers = {t: len(ns) for t, ns in consumers.items()}
    outputs = {o.name for o in model.graph.output}
    fuse: dict[str, tuple] = {}   # conv node name -> (conv, adc, attributes, x, channels, replaced nodes)
    for L in mapping.layers:
        if L.adc is None or L.input_quant is None or L.slicing is None:
            continue
        if not (L.slicing.planes > 1 or L.slicing.bit_serial or L.input_quant.bits <= 8):
            continue
        for chunk in L.chunk_list:
            conv = nodes.get(N.node(L.name, N.ARRAY_MAC, chunk.suffix))
            adc = nodes.get(N.node(L.name, N.ADC, chunk.suffix))
            if conv is None or adc is None or conv.op_type != N.ARRAY_MAC_OP or conv.domain not in ("", "ai.onnx"):
                continue
            if adc.domain != DOMAIN or adc.op_type not in FUSED or adc.input[0] != conv.output[0]:
                continue
            if len(conv.input) > 2 and conv.input[2] or conv.output[0] in outputs or readers[conv.output[0]] != 1:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or conv.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[conv.input[1]])
            if w.ndim != 4 or not _integer_bytes(w):
                continue
            planes = L.slicing.planes > 1 or L.slicing.bit_serial
            signed = 0 if planes else int(L.input_quant.signed)
            gathered = _gather_source(conv, producers, inits, readers)
            if gathered is None:
                gathered = (conv.input[0], np.arange(w.shape[1] * int(attrs.get("group", 1)), dtype=np.int64), [])
            fuse[conv.name] = (conv, adc, dict(attrs, x_signed=signed, x_bits=1 if planes else L.input_quant.bits),
                               *gathered)
    if not fuse:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop = {adc.name for _, adc, *_ in fuse.values()} | {g.name for *_, rep in fuse.values() for g in rep[:1]}
    # a Pad goes when every reader of its output is a gather this rewrite replaces
    for *_, rep in fuse.values():
        for pad in rep[1:]:
            gathers = {n.name for n in consumers.get(pad.output[0], [])}
            if gathers <= drop:
                drop.add(pad.name)
    extra = _epilogues(mapping, fuse, nodes, inits, consumers, outputs, drop, _shapes(model))
    new_nodes = []
    for n in out.graph.node:
        if n.name in drop:
            continue
        if n.name not in fuse:
            new_nodes.append(n)
            continue
        conv, adc, attrs, x, channels, _ = fuse[n.name]
        adc_attrs = {a.name: helper.get_attribute_value(a) for a in adc.attribute}
        adc_inputs = list(adc.input[1:])
        if adc.op_type not in N.RECOMBINE_OPS:
            adc_attrs.update(planes=1, groups=int(attrs.get("group", 1)), tiles=1, slices=1)
            adc_inputs.append(ONE)
        chan = f"{adc.name}/pimc_fuse/channels"
        out.graph.initializer.append(numpy_helper.from_array(channels, chan))
        ep = extra.get(conv.name, {})
        x = ep.get("x", x)
        ep_inputs = [ep.get("x_scale", SCALAR_ONE), ep.get("addend", SCALAR_ZERO), ep.get("out_scale", SCALAR_ONE),
                     ep.get("out_bias", SCALAR_ZERO), ep.get("residual", SCALAR_NEG_ZERO)]
        new_nodes.append(helper.make_node(
            FUSED[adc.op_type], [x, chan, conv.input[1], *adc_inputs, *ep_inputs], [ep.get("y", adc.output[0])],
            name=adc.name, domain=DOMAIN,
            strides=list(attrs.get("strides", [1, 1])), pads=list(attrs.get("pads", [0, 0, 0, 0])),
            dilations=list(attrs.get("dilations", [1, 1])), group=int(attrs.get("group", 1)),
            x_signed=attrs["x_signed"], x_bits=int(attrs["x_bits"]), relu=int(ep.get("relu", 0)), **adc_attrs))
    if any(adc.op_type not in N.RECOMBINE_OPS for _, adc, *_ in fuse.values()):
        out.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), ONE))
    out.graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), SCALAR_ONE),
                                  numpy_helper.from_array(np.array(0.0, np.float32), SCALAR_ZERO),
                                  numpy_helper.from_array(np.array(-0.0, np.float32), SCALAR_NEG_ZERO)])
    del out.graph.node[:]
    out.graph.node.extend(_topological(new_nodes))
    have = {f.name for f in out.functions}
    used = sorted({FUSED[adc.op_type] for _, adc, *_ in fuse.values()})
    out.functions.extend(f for f in function_protos(used) if f.name not in have)
    return out, len(fuse)


def _topological(nodes: list) -> list:
    """``nodes`` in a topological order, the given order wherever it allows (a fused op that reads
    a residual computed further down the list moves after its producer)."""
    import networkx as nx
    g = nx.DiGraph()
    g.add_nodes_from(range(len(nodes)))
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    g.add_edges_from((made[t], i) for i, n in enumerate(nodes) for t in n.input if t in made)
    return [nodes[i] for i in nx.lexicographical_topological_sort(g)]


def _per_channel(t: onnx.TensorProto, cout: int) -> bool:
    """Whether a Mul/Add constant broadcasts over (B, cout, H, W) as one value per channel (or one value)."""
    dims = list(t.dims)
    return int(np.prod(dims)) == 1 or (int(np.prod(dims)) == cout and dims[-3:] == [cout, 1, 1] and len(dims) <= 4)


def _shapes(model: onnx.ModelProto) -> dict:
    """Tensor name -> its inferred shape (dims as ints or symbols; None where one is unknown), by
    onnx shape inference; {} where it fails (then no residual Add is fused)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # onnx raises several types; without shapes nothing depends on them
        return {}
    out = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def _sole_reader(t, consumers, outputs):
    """The one node reading tensor ``t``, or None (no reader, several, or ``t`` is a graph output)."""
    r = consumers.get(t, [])
    return r[0] if len(r) == 1 and t not in outputs else None


def _residual_and_relu(y, last, consumers, outputs, inits, shapes, drop) -> str:
    """After a layer's output ``y`` (its last fused chunk's result): a standard ``Add`` that is
    y's only reader, whose other operand is a computed tensor (not an initializer) of y's
    inferred shape (the residual of a ResNet block), goes into the fused op as ``residual``;
    then a ``Relu`` that is the only reader of the result as ``relu`` = 1.  Returns the new output."""
    a = _sole_reader(y, consumers, outputs)
    if (a is not None and a.op_type == "Add" and a.domain in ("", "ai.onnx") and len(a.input) == 2
            and list(a.input).count(y) == 1):
        other = a.input[1] if a.input[0] == y else a.input[0]
        sy, so = shapes.get(y), shapes.get(other)
        if other not in inits and sy is not None and sy == so and None not in sy and sy == shapes.get(a.output[0]):
            last["residual"] = other
            y = a.output[0]
            drop.add(a.name)
    r = _sole_reader(y, consumers, outputs)
    if r is not None and r.op_type == "Relu" and r.domain in ("", "ai.onnx"):
        last["relu"] = 1
        y = r.output[0]
        drop.add(r.name)
    return y


def _epilogues(mapping, fuse, nodes, inits, consumers, outputs, drop, shapes) -> dict:
    """For each layer whose chunks all fuse: which of its QuantizeInput, Sum of chunks,
    dequantization Mul and bias Add go into its fused nodes (names added to ``drop``), as
    {conv name: {"x", "x_scale", "addend", "out_scale", "out_bias", "y"}} (only what changes)."""
    def only_reader(t, node) -> bool:
        r = _sole_reader(t, consumers, outputs)
        return r is not None and r.name == node.name

    extra: dict[str, dict] = {}
    for L in mapping.layers:
        convs = [nodes.get(N.node(L.name, N.ARRAY_MAC, c.suffix)) for c in L.chunk_list]
        if not convs or any(c is None or c.name not in fuse for c in convs):
            continue
        adcs = [fuse[c.name][1] for c in convs]
        ep = {c.name: {} for c in convs}
        # the layer's input quantization: when only the fused chunks (and the gathers they replace) read it
        q = nodes.get(N.node(L.name, N.QUANTIZE_INPUT))
        attrs = fuse[convs[0].name][2]
        if (q is not None and q.op_type == "QuantizeInput" and q.domain == DOMAIN
                and {fuse[c.name][3] for c in convs} == {q.output[0]} and q.output[0] not in outputs
                and q.input[1] in inits and int(np.prod(inits[q.input[1]].dims)) == 1
                and all(r.name in drop or r.name in fuse for r in consumers.get(q.output[0], []))):
            qa = {a.name: helper.get_attribute_value(a) for a in q.attribute}
            if qa.get("bits") == attrs["x_bits"] and qa.get("signed", 0) == attrs["x_signed"]:
                for c in convs:
                    ep[c.name].update(x=q.input[0], x_scale=q.input[1])
                drop.add(q.name)
        # the Sum of chunks: a left fold, chunk i adds chunk i-1's running sum
        y, summed = adcs[0].output[0], True
        if len(convs) > 1:
            s = nodes.get(N.node(L.name, N.SUM_CHUNKS))
            summed = (s is not None and s.op_type == "Sum" and list(s.input) == [a.output[0] for a in adcs]
                      and all(only_reader(a.output[0], s) for a in adcs))
            if summed:
                for prev, c in zip(adcs, convs[1:]):
                    ep[c.name]["addend"] = prev.output[0]
                y = s.output[0]
                drop.add(s.name)
        if summed:   # then the dequantization Mul and the bias Add, as far as they apply per channel
            last = ep[convs[-1].name]
            for role, op, key in ((N.DEQUANTIZE, "Mul", "out_scale"), (N.BIAS, "Add", "out_bias")):
                m = nodes.get(N.node(L.name, role))
                if (m is None or m.op_type != op or m.domain not in ("", "ai.onnx") or len(m.input) != 2
                        or m.input[0] != y or not only_reader(y, m) or m.input[1] not in inits
                        or not _per_channel(inits[m.input[1]], L.cout)):
                    break
                last[key] = m.input[1]
                y = m.output[0]
                drop.add(m.name)
            # then the block's residual Add (a computed tensor of the output's shape) and its Relu
            y = _residual_and_relu(y, last, consumers, outputs, inits, shapes, drop)
            last["y"] = y
        extra.update({name: e for name, e in ep.items() if e})
    return extra
