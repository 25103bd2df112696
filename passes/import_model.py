"""Import and normalise an ONNX model.

Accepts: any ONNX ModelProto whose default-domain opset is 7..28 (models from
both torch exporters included).
Guarantees: the model is at opset >= 17 (converted up when older, down to the
newest opset onnxruntime runs when newer), passes onnx.checker, has inferred
shapes, a symbolic batch dimension wherever the graph allows it (see
``free_batch``), its constant subgraphs are folded (so Conv/Gemm/MatMul weights computed
from Constant/Identity/DequantizeLinear chains become initializers), dead nodes
are removed and nodes are topologically sorted.  Raises PimcError naming the
problem otherwise.
"""
from __future__ import annotations

import logging
import sys

import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

# graphsurgeon logs warnings (and a hint to install "colored") on stdout
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

from pimc.core.errors import PimcError
from pimc.model import PimModel
from .base import Transformation
from .free_batch import free_batch

MIN_OPSET, MAX_OPSET_IN = 7, 28
TARGET_MIN, ORT_MAX = 17, 21


def opset_of(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def normalise_proto(model: onnx.ModelProto, source: str = "<memory>") -> tuple[onnx.ModelProto, int, int | None, str | None]:
    """Opset/IR handling, checking, a symbolic batch (``free_batch``) and shape inference
    on a raw ModelProto.  Returns (model, opset, the fixed batch or None, a note or None)."""
    opset = opset_of(model)
    if opset is None:
        raise PimcError(f"'{source}': the model imports no default-domain opset; re-export it with a standard ONNX opset")
    if not MIN_OPSET <= opset <= MAX_OPSET_IN:
        raise PimcError(f"'{source}': opset {opset} is not supported (supported: {MIN_OPSET}..{MAX_OPSET_IN}); "
                        f"re-export the model with opset 17..21")
    target = opset
    if opset < TARGET_MIN:
        target = TARGET_MIN
    elif opset > ORT_MAX:
        target = ORT_MAX
    if target != opset:
        try:
            model = onnx.version_converter.convert_version(model, target)
        except Exception as e:  # the converter raises several types
            raise PimcError(f"'{source}': could not convert opset {opset} to {target} ({str(e).splitlines()[0]}); "
                            f"re-export the model with opset {TARGET_MIN}..{ORT_MAX}")
    if model.ir_version > 10:
        model.ir_version = 10
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise PimcError(f"'{source}': not a valid ONNX model: {str(e).splitlines()[0]}")
    model = cast_like_to_cast(model)
    model, fixed_batch, note = free_batch(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise PimcError(f"'{source}': shape inference failed: {str(e).splitlines()[0]}")
    return model, target, fixed_batch, note


def cast_like_to_cast(model: onnx.ModelProto) -> onnx.ModelProto:
    """``CastLike(x, y)`` reads only y's element type: where that type is known, write
    ``Cast(x, to=type)`` instead, so that constant x folds (the dynamo exporter with
    ``optimize=False`` builds each Conv's zero bias as ``Expand(CastLike(0, input), ...)``,
    which would otherwise keep the bias, and so the Conv, from being constant)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for n in model.graph.node:
        if n.op_type == "CastLike" and n.domain in ("", "ai.onnx") and len(n.input) == 2 and n.input[1] in types:
            cast = onnx.helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=types[n.input[1]])
            n.CopyFrom(cast)
    return model


class ImportModel(Transformation):
    """See module docstring."""

    name = "import_model"

    def apply(self, model: PimModel):
        g = model.graph
        n_before = len(g.nodes)
        logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
        g.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
        return model, len(g.nodes) != n_before


_SAID: set[tuple[str, str]] = set()


def import_graph(proto: onnx.ModelProto, source: str) -> tuple[gs.Graph, int, int | None, str | None]:
    """(graph, opset, fixed batch or None, note or None); the note is printed once per process."""
    proto, opset, fixed_batch, note = normalise_proto(proto, source)
    if note and (source, note) not in _SAID:
        _SAID.add((source, note))
        print(f"pimc: note: '{source}': {note}", file=sys.stderr)
    gs_log = logging.getLogger("onnx_graphsurgeon")
    gs_log.setLevel(logging.ERROR)
    graph = gs.import_onnx(proto)
    return graph, opset, fixed_batch, note
