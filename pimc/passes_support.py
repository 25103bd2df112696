"""Building the PimModel that the first pass receives."""
from __future__ import annotations

import onnx

from .config import CompileConfig
from .model import PimModel


def new_pim_model(proto: onnx.ModelProto, config: CompileConfig, source: str) -> PimModel:
    from pimc.passes.import_model import import_graph
    graph, opset = import_graph(proto, source)
    return PimModel(graph=graph, config=config, opset=opset, source=source)
