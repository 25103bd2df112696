"""Calibration data and statistics collection by running the model in onnxruntime.

Calibration inputs come from ``config.calib_data`` (a .npy, or a .npz whose
array is named ``x`` or after the model input; preprocessed exactly as the model
expects), limited to ``config.calib_samples`` samples.  Without a file, pimc
draws ``config.calib_samples`` (at most 64) standard-normal inputs from
``config.seed`` and records that the ranges are synthetic: pass real data for
real ranges.  The evaluation images must never be used here.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx

from .core.errors import PimcError
from .io import load_array_file
from .model import PimModel
from pimc.runtime.session import open_session, run_batches

BATCH = 64


def _feed_from(model: PimModel, arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Model input name -> at most calib_samples checked rows, from named arrays."""
    inputs = list(model.graph.inputs)
    feed = {}
    for t in inputs:
        if t.name in arrays:
            a = arrays[t.name]
        elif len(inputs) == 1 and len(arrays) == 1:
            a = next(iter(arrays.values()))
        elif len(inputs) == 1 and "x" in arrays:
            a = arrays["x"]
        else:
            raise PimcError(f"{where} has no array for model input '{t.name}'; name the arrays after the model "
                            f"inputs (found: {', '.join(arrays) or 'none'})")
        feed[t.name] = _check_input(t, a[: model.config.calib_samples], where)
    return feed


def set_calibration_arrays(model: PimModel, data) -> None:
    """Calibration inputs given in memory (``compile_model(..., calib_inputs=...)``): an
    array (one model input), a dict of arrays named after the model inputs, or an
    iterable of such batches (as onnxruntime.quantization's calibration data readers
    give them), read until ``calib_samples`` rows."""
    if isinstance(data, np.ndarray):
        arrays = {"": data}
    elif isinstance(data, dict):
        arrays = dict(data)
    else:
        parts: dict[str, list] = {}
        rows = 0
        for batch in data:
            batch = {"": batch} if isinstance(batch, np.ndarray) else dict(batch)
            for k, v in batch.items():
                parts.setdefault(k, []).append(np.asarray(v))
            rows += len(next(iter(batch.values())))
            if rows >= model.config.calib_samples:
                break
        if not parts:
            raise PimcError("calib_inputs: the calibration batches are empty")
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
    model.calib_inputs = _feed_from(model, {k: np.asarray(v) for k, v in arrays.items()}, "calib_inputs")
    model.calibration = {"source": "memory", "samples": int(next(iter(model.calib_inputs.values())).shape[0])}


def calibration_inputs(model: PimModel) -> dict[str, np.ndarray]:
    if model.calib_inputs is not None:
        return model.calib_inputs
    cfg = model.config
    inputs = list(model.graph.inputs)
    if cfg.calib_data:
        arrays = load_array_file(cfg.calib_data, "--calib-data")
        feed = _feed_from(model, arrays, f"--calib-data: '{cfg.calib_data}'")
        source = {"source": "file", "path": str(cfg.calib_data), "samples": int(next(iter(feed.values())).shape[0])}
    else:
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.calib_samples, 64)
        feed = {}
        for t in inputs:
            shape = t.shape
            if shape is None or any(not isinstance(d, int) for d in list(shape)[1:]):
                raise PimcError(f"model input '{t.name}' has dynamic sizes {list(shape) if shape else '?'}: "
                                f"synthetic calibration needs static sizes; pass --calib-data with real inputs")
            if np.dtype(t.dtype) != np.float32:
                raise PimcError(f"model input '{t.name}' is {np.dtype(t.dtype)}: pass --calib-data with real inputs")
            feed[t.name] = rng.standard_normal((n, *shape[1:])).astype(np.float32)
        source = {"source": "synthetic", "distribution": "N(0,1)", "seed": cfg.seed, "samples": n}
        if model.frozen is not None and all(model.frozen.covers(p.name, model.layer_config(p.name).pim)
                                            for p in model.layers.values()):
            print(f"pimc: note: the frozen plan gives every layer's scales; {n} synthetic inputs are used only for "
                  f"shapes", file=sys.stderr)
        else:
            adc = ""
            if any(model.layer_config(p.name).pim for p in model.layers.values()):
                adc = (", and ADC ranges too" if cfg.adc_range == "calibrated" else
                       "; ADC ranges use the full worst-case range (calibrated ADC ranges need real data)")
            print(f"pimc: warning: no --calib-data: activation ranges calibrated on {n} synthetic N(0,1) inputs{adc}; "
                  f"pass --calib-data with real (training) inputs for real ranges", file=sys.stderr)
    model.calib_inputs = feed
    model.calibration = source
    return feed


def _check_input(t, a: np.ndarray, where: str) -> np.ndarray:
    want = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
    if a.dtype != want:
        if np.issubdtype(a.dtype, np.number) and want == np.float32:
            a = a.astype(np.float32)
        else:
            raise PimcError(f"{where} holds {a.dtype}, model input '{t.name}' wants {want}")
    shape = t.shape
    if shape is not None:
        if a.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(list(shape)[1:], a.shape[1:])):
            raise PimcError(f"{where} has shape {list(a.shape)}, model input '{t.name}' wants "
                            f"{list(shape)}; preprocess the data into the model's input layout")
    if a.shape[0] == 0:
        raise PimcError(f"{where} holds no samples")
    return a


def _place_after_producers(graph: onnx.GraphProto, first_probe: int) -> None:
    """Move the probe nodes (from index ``first_probe`` on) to just after the node producing
    their input.  With the priority-based execution order the probe sessions use, this lets a
    probed tensor be freed sooner (ResNet-20, bit-serial W8 with 1-bit cells, 230 probes at
    batch 64: 887 MiB peak instead of 955 MiB); onnxruntime's default order ignores it."""
    nodes = list(graph.node)
    model_nodes, probes = nodes[:first_probe], nodes[first_probe:]
    produced_by = {o: i for i, n in enumerate(model_nodes) for o in n.output}
    after: dict[int, list] = {}
    made = {o for p in probes for o in p.output}
    pending = []
    for p in probes:
        src = [produced_by[i] for i in p.input if i in produced_by]
        if any(i in made for i in p.input) or not src:
            pending.append(p)       # reads another probe's output or only inputs/initializers: keep at the end
        else:
            after.setdefault(max(src), []).append(p)
    order = []
    for i, n in enumerate(model_nodes):
        order.append(n)
        order.extend(after.get(i, []))
    order.extend(pending)
    del graph.node[:]
    graph.node.extend(order)


def run_with_probes(model: PimModel, probes) -> list[list[np.ndarray]]:
    """Run the model on the calibration inputs with extra output tensors.

    ``probes(proto) -> list[str]`` adds nodes to the exported proto and returns
    the names of tensors to fetch.  Returns, per probe tensor, the list of
    per-batch values.
    """
    out: list[list[np.ndarray]] = []

    def keep(res):
        if not out:
            out.extend([] for _ in res)
        for j, r in enumerate(res):
            out[j].append(r)
    stream_probes(model, probes, keep)
    return out


def stream_probes(model: PimModel, probes, on_batch, batch: int = BATCH, prune: bool = False,
                  rows: int | None = None) -> None:
    """As :func:`run_with_probes`, but hand each batch's probe values to ``on_batch(values)``
    and keep nothing (streaming statistics: memory bounded by one batch).  ``prune``: drop
    the nodes no probe needs (for probes that rewire the model); ``rows``: only the first
    ``rows`` calibration samples."""
    feed = calibration_inputs(model)
    if rows is not None:
        feed = {k: v[:rows] for k, v in feed.items()}
    proto = model.to_onnx()
    before = len(proto.graph.node)
    names = probes(proto)
    _place_after_producers(proto.graph, before)
    del proto.graph.output[:]
    for n in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    if prune:
        need, keep = set(names), []
        for n in reversed(proto.graph.node):
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(i for i in n.input if i)
        del proto.graph.node[:]
        proto.graph.node.extend(reversed(keep))
    sess = open_session(proto, fusions=True, priority_order=True)
    # probes reduce over the batch: the padding rows of a fixed-batch model repeat a sample and change no min/max
    for _, _, res in run_batches(sess, names, feed, batch, trim=False):
        on_batch(res)


def strided_probe(proto: onnx.ModelProto, src: str, name: str, opset: int, k: int) -> str:
    """Add a node giving ``src`` (N, C, H, W) at every k-th row and column (``src`` itself when
    k = 1 or before opset 10): the sample a histogram calibration reads."""
    if k == 1 or opset < 10:
        return src
    init = lambda n, v: proto.graph.initializer.append(
        onnx.helper.make_tensor(n, onnx.TensorProto.INT64, [len(v)], v))
    init(name + "_starts", [0, 0])
    init(name + "_ends", [2 ** 62, 2 ** 62])
    init(name + "_axes", [2, 3])
    init(name + "_steps", [k, k])
    proto.graph.node.append(onnx.helper.make_node(
        "Slice", [src, name + "_starts", name + "_ends", name + "_axes", name + "_steps"], [name]))
    return name
