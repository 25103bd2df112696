"""BatchNorm calibration on a chip (PIM-QAT's BN calibration), without PyTorch.

A model compiled with ``--fold-bn output`` keeps each BatchNorm as the
per-column affine after its layer's arrays (``{layer}/pimc/out_scale`` and
``out_bias``), and its parameters (gamma, beta, mean, var, eps, the layer's
bias) in the mapping (``bn_stats``).  On a chip, gain/offset spreads, noise and
device variation shift the statistics of each layer's pre-BN output, so the
digital running mean/var no longer normalise it.  ``calibrate_bn`` re-estimates
mean and var of every such layer under one chip instance's non-ideal forward
pass, layer by layer in dataflow order (layer l is measured with layers before
it already recalibrated), on calibration images, and writes the new affine

    s' = gamma / sqrt(var' + eps),   out_scale = in_scale * w_scale * s',
    out_bias = bias * s' + beta - mean' * s'

back into the IR (same formulas and float32 rounding as the compiler).  The
result is a model for that chip: the metadata ``pimc.bn_calibration`` records
the chip, the images and the per-layer shifts; the mapping's ``bn_stats`` hold
the new mean/var.
"""
from __future__ import annotations

import json

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from .core import names as N
from .core.planning import output_affine
from .core.errors import PimcError


def bn_layers(mapping) -> list:
    """Layers (LayerMapping) whose BatchNorm is kept as an output affine after quantized arrays."""
    return [L for L in mapping.layers if L.bn_stats is not None and L.input_quant and L.weight_quant]


def _dataflow_order(model: onnx.ModelProto, layers: list) -> list:
    """The layers sorted so that every layer comes after those feeding it (networkx)."""
    from .core.mapping import layer_graph
    g = layer_graph(model)
    pos = {n: i for i, n in enumerate(nx.topological_sort(g))}
    return sorted(layers, key=lambda L: pos.get(N.node(L.name, N.DEQUANTIZE), 0))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return out


def input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def channel_stats(model: onnx.ModelProto, chip, tensor: str, x: np.ndarray, batch: int,
                  transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and variance of ``tensor`` over the images ``x``
    (float64 sums), on chip ``chip``; ``transform`` maps each batch's values first."""
    from pimc.runtime.session import open_session, run_batches
    sess = open_session(with_outputs(model, [tensor]), chip)
    name = input_name(model)
    s1 = s2 = None
    count = 0
    for _, _, (v,) in run_batches(sess, [tensor], {name: x}, batch):
        v = v.astype(np.float64)
        if transform is not None:
            v = transform(v)
        axes = tuple(a for a in range(v.ndim) if a != 1)
        a, b = v.sum(axis=axes), np.square(v).sum(axis=axes)
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        count += v.size // v.shape[1]
    mean = s1 / count
    return mean, np.maximum(s2 / count - mean ** 2, 0.0)


def calibrate_bn(model: onnx.ModelProto, chip, x: np.ndarray, *, batch: int = 64, source: str = "model",
                 log=None) -> tuple[onnx.ModelProto, dict]:
    """Recalibrate the kept BatchNorms of ``model`` on ``chip`` (a ChipConfig) with
    calibration images ``x`` (preprocessed).  Returns (new model, record)."""
    import dataclasses

    from .core.mapping import read_mapping

    mapping = read_mapping(model, source)
    layers = bn_layers(mapping)
    if not layers:
        raise PimcError(f"'{source}': no layer keeps a BatchNorm affine after its arrays; compile the model "
                        f"with --fold-bn output")
    if len(x) == 0:
        raise PimcError("BN calibration needs at least one calibration image")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    new_stats = {}
    per_layer = []
    for k, L in enumerate(_dataflow_order(out, layers)):
        deq = nodes.get(N.node(L.name, N.DEQUANTIZE))
        if deq is None or N.tensor(L.name, N.OUT_BIAS) not in inits:
            raise PimcError(f"'{source}': layer '{L.name}' has no output affine "
                            f"({N.node(L.name, N.DEQUANTIZE)} / {N.OUT_BIAS}); recompile it with this pimc version")
        st = L.bn_stats
        gamma, beta, eps = (np.asarray(st["gamma"]), np.asarray(st["beta"]), float(st["eps"]))
        bias = np.asarray(st["bias"])
        w_deq = np.float32(L.input_quant.scale) * np.asarray(L.weight_quant.scales, np.float32)
        shape = [1, -1] + [1] * 2

        def pre_bn(acc, w_deq=w_deq, bias=bias):
            return acc * w_deq.astype(np.float64).reshape(shape) + bias.reshape(shape)

        mean, var = channel_stats(out, chip, deq.input[0], x, batch, pre_bn)
        s = (gamma / np.sqrt(var + eps)).astype(np.float32)
        t = (beta - mean * s.astype(np.float64)).astype(np.float32)
        out_scale, shift = output_affine(L.input_quant.scale, L.weight_quant.scales, s, bias, t, L.output_rescale)
        for name, v in ((N.tensor(L.name, N.OUT_SCALE), out_scale), (N.tensor(L.name, N.OUT_BIAS), shift)):
            old = inits[name]
            old.CopyFrom(numpy_helper.from_array(v.reshape(numpy_helper.to_array(old).shape), name))
        old_mean, old_var = np.asarray(st["mean"]), np.asarray(st["var"])
        std_old = np.sqrt(old_var + eps)
        per_layer.append({"layer": L.name, "mean_shift_over_std": float(np.max(np.abs(mean - old_mean) / std_old)),
                          "std_ratio_min": float(np.min(np.sqrt(var + eps) / std_old)),
                          "std_ratio_max": float(np.max(np.sqrt(var + eps) / std_old))})
        new_stats[L.name] = {**st, "mean": [float(v) for v in mean], "var": [float(v) for v in var]}
        if log:
            log(f"calibrate-bn: layer {k + 1}/{len(layers)} {L.name}: max |mean shift| "
                f"{per_layer[-1]['mean_shift_over_std']:.3f} std")
    record = {"chip": json.loads(chip.to_json()), "images": int(len(x)), "layers": per_layer}
    meta = {p.key: p for p in out.metadata_props}
    mapping = dataclasses.replace(mapping, layers=tuple(
        dataclasses.replace(L, bn_stats=new_stats[L.name]) if L.name in new_stats else L for L in mapping.layers))
    meta["pimc.mapping"].value = json.dumps(mapping.to_record(), sort_keys=True)
    if "pimc.bn_calibration" in meta:
        meta["pimc.bn_calibration"].value = json.dumps(record)
    else:
        out.metadata_props.add(key="pimc.bn_calibration", value=json.dumps(record))
    return out, record
