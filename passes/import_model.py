"""Import and normalise an ONNX model.

Accepts: any ONNX ModelProto whose default-domain opset is 7..28 (models from
both torch exporters included).
Guarantees: the model is at opset >= 17 (converted up when older, down to the
newest opset onnxruntime runs when newer), passes onnx.checker, has inferred
shapes, its constant subgraphs are folded (so Conv/Gemm/MatMul weights computed
from Constant/Identity/DequantizeLinear chains become initializers), dead nodes
are removed and nodes are topologically sorted.  Raises PimcError naming the
problem otherwise.
"""
from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

# graphsurgeon logs warnings (and a hint to install "colored") on stdout
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

from pimc.errors import PimcError
from pimc.model import PimModel
from .base import Transformation

MIN_OPSET, MAX_OPSET_IN = 7, 28
TARGET_MIN, ORT_MAX = 17, 21


def opset_of(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def normalise_proto(model: onnx.ModelProto, source: str = "<memory>") -> tuple[onnx.ModelProto, int]:
    """Opset/IR handling, checking and shape inference on a raw ModelProto."""
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
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise PimcError(f"'{source}': shape inference failed: {str(e).splitlines()[0]}")
    return model, target


class ImportModel(Transformation):
    """See module docstring."""

    name = "import_model"

    def apply(self, model: PimModel):
        g = model.graph
        n_before = len(g.nodes)
        logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
        g.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
        return model, len(g.nodes) != n_before


def import_graph(proto: onnx.ModelProto, source: str) -> tuple[gs.Graph, int]:
    proto, opset = normalise_proto(proto, source)
    gs_log = logging.getLogger("onnx_graphsurgeon")
    gs_log.setLevel(logging.ERROR)
    graph = gs.import_onnx(proto)
    return graph, opset
