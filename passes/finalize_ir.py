"""Finalize the PIM IR: clean up, sort, check.

Accepts: a model after any other pass.
Guarantees: unused nodes and tensors removed, nodes topologically sorted, the
exported model (IR ops with their function bodies, metadata ``pimc.version``,
``pimc.config``, ``pimc.mapping``) passes ``onnx.checker``; ``model.stage`` is
set to ``final``.  Changes no output.
"""
from __future__ import annotations

import onnx

from pimc.core.errors import PimcError
from pimc.model import PimModel
from .base import Transformation


class FinalizeIR(Transformation):
    name = "finalize_ir"
    exact = True

    def apply(self, model: PimModel):
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()   # checked as it will be written
        model.stage = "final"
        try:
            onnx.checker.check_model(model.to_onnx())
        except onnx.checker.ValidationError as e:  # a compiler bug, but say it plainly
            raise PimcError(f"internal error: the compiled model fails onnx.checker: {str(e).splitlines()[0]}; "
                            f"please report it with the input model")
        return model, False
