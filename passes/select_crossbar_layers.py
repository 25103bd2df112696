"""Claim the layers that map onto crossbar arrays; list every other op as digital.

Accepts: a normalised model (ImportModel).
Guarantees: each Conv with a constant 4-D weight (any stride, padding,
dilation, group count, auto_pad), each Gemm with a constant B (transA=0, bias a
constant vector or scalar, alpha/beta folded in) and each MatMul with a constant
2-D right operand is replaced by an equivalent float layer emitted from a
LayerPlan (``model.layers``).  Every other node stays as it is and is listed
in ``model.digital_ops`` with the reason.  Outputs are unchanged up to float
rounding (fc layers become a 1x1 Conv).
Each layer gets its options (``model.layer_config``): the compile config with the
per-layer rules that match it applied (``--digital-layers``, the hardware file's
``[[layer]]`` tables; ``pimc.core.config.layer_configs``); a pattern matching no
layer is an error.
Raises PimcError for a Conv/Gemm/MatMul whose channel counts cannot be
inferred (a weight that is neither constant nor of static shape).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from pimc.core.config import layer_configs
from pimc.core.errors import PimcError
from pimc.core.mapping import LayerPlan
from pimc.core.planning import check_kernel_fits
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation

MAC_OPS = ("Conv", "Gemm", "MatMul")


def _static_shape(t) -> bool:
    return t is not None and t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape)


class SelectCrossbarLayers(Transformation):
    """See module docstring."""

    name = "select_crossbar_layers"

    def apply(self, model: PimModel):
        g = model.graph
        changed = False
        used_names = set()
        for i, node in enumerate(list(g.nodes)):
            if not node.name or node.name in used_names:
                node.name = f"{node.op}_{i}" if not node.name else f"{node.name}_{i}"
            used_names.add(node.name)
        for node in list(g.nodes):
            if node.domain not in ("", "ai.onnx", None):
                model.digital_ops.append({"node": node.name, "op_type": node.op, "reason": f"custom domain '{node.domain}'"})
                continue
            if node.op not in MAC_OPS:
                model.digital_ops.append({"node": node.name, "op_type": node.op, "reason": "not a matrix-vector op"})
                continue
            plan, reason = self._plan(node)
            if plan is None:
                model.digital_ops.append({"node": node.name, "op_type": node.op, "reason": reason})
                continue
            plan.source_initializers = {k: node.inputs[i].name for k, i in (("weight", 1), ("bias", 2))
                                        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name}
            node.inputs.clear()
            node.outputs.clear()
            g.nodes.remove(node)
            emit_layer(g, plan)
            model.layers[plan.name] = plan
            changed = True
        resolved = layer_configs(model.config, [(p.name, p.source_initializers.get("weight"))
                                                for p in model.layers.values()])
        for p in model.layers.values():
            cfg, why = resolved[p.name]
            p.scheme = cfg.scheme
            p.rules = why
            if why:
                model.layer_configs[p.name] = cfg
            if cfg.pim:
                check_kernel_fits(p, cfg.array_rows, cfg.tile_mode)
        if model.frozen is not None:
            model.frozen.check_layers(list(model.layers), model.source)
        return model, changed

    # -- per op ---------------------------------------------------------------
    def _plan(self, node: gs.Node):
        x = node.inputs[0]
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            return None, f"input dtype {np.dtype(x.dtype)} (only float32 layers are mapped)"
        if node.op == "Conv":
            return self._conv(node)
        if node.op == "Gemm":
            return self._gemm(node)
        return self._matmul(node)

    def _weight_or_fail(self, node, idx: int, what: str):
        w = node.inputs[idx]
        if isinstance(w, gs.Constant):
            return np.asarray(w.values, np.float32), None
        if not _static_shape(w):
            raise PimcError(f"node '{node.name}' ({node.op}): cannot infer its channel counts: {what} '{w.name}' "
                            f"is neither a constant nor of static shape; export the model with constant weights")
        return None, f"{what} '{w.name}' is not a constant"

    def _conv(self, node):
        w, why = self._weight_or_fail(node, 1, "weight")
        if w is None:
            return None, why
        if w.ndim != 4:
            return None, f"{w.ndim - 2}-D convolution (only 2-D Conv is mapped)"
        b = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bt = node.inputs[2]
            if not isinstance(bt, gs.Constant):
                return None, "bias is not a constant"
            b = np.asarray(bt.values, np.float32)
        a = node.attrs
        plan = LayerPlan(
            name=node.name, op_type="Conv", kind="conv", x=node.inputs[0], y=node.outputs[0],
            weight=w, bias=b, group=int(a.get("group", 1)),
            strides=list(a.get("strides", [1, 1])), pads=list(a.get("pads", [0, 0, 0, 0])),
            dilations=list(a.get("dilations", [1, 1])),
            auto_pad=a.get("auto_pad", "NOTSET") if isinstance(a.get("auto_pad", "NOTSET"), str) else a["auto_pad"].decode(),
        )
        xs = node.inputs[0].shape
        if xs is not None and len(xs) == 4 and all(isinstance(d, int) for d in xs[2:]):
            plan.in_spatial = [int(xs[2]), int(xs[3])]
        return plan, None

    def _fc_plan(self, node, w_kn: np.ndarray, b):
        """w_kn: (K, N) so that y = x @ w_kn + b."""
        wt = np.ascontiguousarray(w_kn.T)[:, :, None, None].astype(np.float32)
        return LayerPlan(name=node.name, op_type=node.op, kind="fc", x=node.inputs[0], y=node.outputs[0],
                         weight=wt, bias=b)

    def _gemm(self, node):
        a = node.attrs
        if int(a.get("transA", 0)) != 0:
            return None, "transA=1 (only x @ W layers are mapped)"
        w, why = self._weight_or_fail(node, 1, "B")
        if w is None:
            return None, why
        if int(a.get("transB", 0)):
            w = w.T
        w = w * np.float32(a.get("alpha", 1.0))
        b = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            ct = node.inputs[2]
            if not isinstance(ct, gs.Constant):
                return None, "C is not a constant"
            c = np.asarray(ct.values, np.float32) * np.float32(a.get("beta", 1.0))
            if c.size == 1:
                c = np.full(w.shape[1], c.reshape(()), np.float32)
            elif c.ndim == 2 and c.shape[0] == 1:
                c = c.reshape(-1)
            if c.ndim != 1 or c.shape[0] != w.shape[1]:
                return None, f"bias C of shape {list(np.shape(ct.values))} is not per output column"
            b = c
        return self._fc_plan(node, w, b), None

    def _matmul(self, node):
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            return None, "right operand is not a constant"
        w = np.asarray(w.values, np.float32)
        if w.ndim != 2:
            return None, f"constant right operand of rank {w.ndim} (only 2-D weights are mapped)"
        xs = node.inputs[0].shape
        if xs is not None and len(xs) < 2:
            return None, "1-D left operand"
        return self._fc_plan(node, w, None), None
