"""Make a static leading batch dimension symbolic, where the graph allows it.

``torch.onnx.export(..., dynamo=True)`` without ``dynamic_shapes`` (and many
other exporters) write inputs with a fixed batch, typically 1.  pimc calibrates
on batches of many images and users run many images at once, so on import:

* every graph input (and output) whose leading dimension is the static batch B
  gets the symbolic dimension ``batch``;
* a ``Reshape`` whose target shape (a constant, or one that constant folding at
  batch B computes) starts with B, applied to a tensor
  whose leading dimension is B, copies the leading dimension instead (target
  ``0``; an ``allowzero`` flag, which only matters for 0 entries and so is
  dropped where the target has none): the same tensor at batch B, and row ``i`` stays sample ``i`` at any
  batch (row-major layout keeps each leading index's block whole);
* the result is accepted only if onnxruntime runs it at batch B + 1 with one
  output row per sample, equal to the original model at batch B and to single
  samples run alone.

Otherwise the graph really depends on its batch (a Reshape that folds the batch
into another axis, a batch-sized constant, ...): the model keeps its fixed batch,
and calibration and every runner feed it batches of exactly B (the last one
padded with copies of its last sample, whose outputs are dropped).
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from pimc.runtime.session import open_session

BATCH_DIM = "batch"


def _graph_inputs(model: onnx.ModelProto) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed leading dimension shared by the model's inputs, or None (symbolic)."""
    lead = {(_dims(i) or [None])[0] for i in _graph_inputs(model)}
    if len(lead) == 1:
        b = lead.pop()
        return b if b else None
    return None


def _const_values(model: onnx.ModelProto) -> dict[str, tuple[str, object]]:
    """name -> ("init", TensorProto) or ("node", the Constant node's value attribute)."""
    out: dict[str, tuple[str, object]] = {t.name: ("init", t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = ("node", a.t)
    return out


def _folded_reshape_targets(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Reshape node name -> its target shape, where constant folding at the fixed batch
    computes it (``Concat`` of constants, ``Shape`` of a static tensor, ...)."""
    import logging

    import onnx_graphsurgeon as gs
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    try:
        g = gs.import_onnx(model)
        g.fold_constants(error_ok=True)
    except Exception:  # folding is an optimisation here: without it nothing is rewritten
        return {}
    return {n.name: np.asarray(n.inputs[1].values) for n in g.nodes
            if n.op == "Reshape" and n.name and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)}


def _candidate(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with a symbolic batch; returns it and the Reshapes rewritten."""
    try:
        shaped = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        shaped = model
    shapes = {vi.name: _dims(vi) for vi in list(shaped.graph.value_info) + list(shaped.graph.input)}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in _graph_inputs(m) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = BATCH_DIM
    del m.graph.value_info[:]
    consts = _const_values(m)
    folded = _folded_reshape_targets(model)
    rewritten = 0
    for n in m.graph.node:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        if n.input[1] in consts:
            target = numpy_helper.to_array(consts[n.input[1]][1])
        elif n.name and n.name in folded:
            target = folded[n.name]
        else:
            continue
        data = shapes.get(n.input[0]) or []
        if target.ndim != 1 or not len(target) or int(target[0]) != batch or not data or data[0] != batch:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            if np.any(target == 0):
                continue
            # allowzero only changes the meaning of 0 entries, and this shape has none: drop it so 0 copies
            keep = [a for a in n.attribute if a.name != "allowzero"]
            del n.attribute[:]
            n.attribute.extend(keep)
        new = target.copy()
        new[0] = 0
        name = f"{n.input[1]}/pimc_batch_copy"
        if name not in consts:
            m.graph.initializer.append(numpy_helper.from_array(new.astype(target.dtype), name))
            consts[name] = ("init", None)
        n.input[1] = name
        rewritten += 1
    return m, rewritten


def _feed(model: onnx.ModelProto, n: int, rng) -> dict[str, np.ndarray] | None:
    from onnx.helper import tensor_dtype_to_np_dtype
    feed = {}
    for vi in _graph_inputs(model):
        dims = _dims(vi)
        if not dims:
            return None
        shape = [n] + [d if d else 8 for d in dims[1:]]
        dt = np.dtype(tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        feed[vi.name] = (rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating)
                         else np.zeros(shape, dt))
    return feed


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return bool(np.array_equal(a, b))
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    return bool(np.all(np.isfinite(a) == np.isfinite(b))) and float(np.nanmax(np.abs(a - b), initial=0.0)) <= 1e-4 * scale


def _check(original: onnx.ModelProto, cand: onnx.ModelProto, batch: int) -> str | None:
    """None when ``cand`` behaves as a batch-independent version of ``original``, else why not."""
    rng = np.random.default_rng(0)
    feed = _feed(original, batch + 1, rng)
    if feed is None:
        return "an input has no shape"
    try:
        # a failing run is an answer here, not an error to print
        s0 = open_session(original, fusions=True, quiet=True)
        s1 = open_session(cand, fusions=True, quiet=True)
        ref = s0.run(None, {k: v[:batch] for k, v in feed.items()})
        got_b = s1.run(None, {k: v[:batch] for k, v in feed.items()})
        got = s1.run(None, feed)
        singles = {k: s1.run(None, {n: v[k:k + 1] for n, v in feed.items()}) for k in sorted({0, batch})}
    except Exception as e:  # onnxruntime raises its own types
        msg = str(e).splitlines()[0]
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", msg)
        where = f"its {node.group(1)} node '{node.group(2)}'" if node else "it"
        return f"{where} fails at batch {batch + 1}"
    for r, gb, g in zip(ref, got_b, got):
        if not _close(gb, r):
            return f"making the batch symbolic changes its outputs at batch {batch}"
        if g.ndim == 0 or g.shape[0] != batch + 1:
            return f"an output has leading dimension {g.shape[0] if g.ndim else 'none'} at batch {batch + 1}"
    for k, outs in singles.items():
        for g, o in zip(got, outs):
            if not _close(g[k:k + 1], o):
                return "samples of one batch change each other's outputs"
    return None


def free_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None, str | None]:
    """(model, fixed batch or None, a note for the user or None).  See the module docstring."""
    batch = static_batch(model)
    if batch is None:
        return model, None, None
    cand, rewritten = _candidate(model, batch)
    why = _check(model, cand, batch)
    if why is None:
        verb = "s copy" if rewritten != 1 else " copies"
        extra = f" ({rewritten} Reshape{verb} the batch dimension now)" if rewritten else ""
        return cand, None, f"the model's inputs had a fixed batch of {batch}; made it symbolic{extra}, so the " \
                           f"compiled model runs at any batch size"
    return model, batch, f"the model's inputs have a fixed batch of {batch} that the graph depends on ({why}); " \
                         f"pimc calibrates and runs it in batches of exactly {batch}"
