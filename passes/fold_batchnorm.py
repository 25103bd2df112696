"""Fold BatchNormalization into the crossbar layer in front of it.

Accepts: a model after SelectCrossbarLayers.
Guarantees: every inference-mode BatchNormalization whose input is a crossbar
layer's output (consumed by that BN alone, not a graph output) with constant
parameters is removed, and its per-channel affine gamma/sqrt(var+eps),
beta - mean*gamma/sqrt(var+eps) is folded, by ``config.fold_bn``:

* ``weights``: into the layer's float weights and bias (the ADC then sees the
  folded weights, as on a chip programmed with them);
* ``output``: into the per-column output affine applied after recombination
  (weights untouched; the ADC sees the unfolded partial sums); the BN's
  parameters are kept in the mapping (``bn_stats``) for ``pimc calibrate-bn``.

Outputs are unchanged up to float rounding.  Other BNs stay digital.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from pimc.core.planning import bn_affine
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class FoldBatchNorm(Transformation):
    name = "fold_batchnorm"

    def apply(self, model: PimModel):
        g = model.graph
        outputs = set(id(t) for t in g.outputs)
        changed = False
        for plan in model.layers.values():
            y = plan.y
            if id(y) in outputs or len(y.outputs) != 1:
                continue
            bn = y.outputs[0]
            if bn.op != "BatchNormalization" or len(bn.outputs) != 1 or bn.inputs[0] is not y:
                continue
            if int(bn.attrs.get("training_mode", 0)):
                continue
            params = bn.inputs[1:5]
            if not all(isinstance(t, gs.Constant) for t in params):
                continue
            gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in params)
            if gamma.shape != (plan.cout,):
                continue
            eps = float(bn.attrs.get("epsilon", 1e-5))
            if plan.bn_output is None:   # the first BatchNorm after the layer (a second one is folded too)
                plan.source_initializers.update(zip(("bn_scale", "bn_bias", "bn_mean", "bn_var"),
                                                    (t.name for t in params)))
            s, t = bn_affine(gamma, beta, mean, var, eps)
            if model.config.fold_bn == "weights":
                plan.weight = (plan.weight.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
                b = plan.bias.astype(np.float64) if plan.bias is not None else np.zeros(plan.cout)
                plan.bias = (b * s + t).astype(np.float32)
                plan.folded_bn = "weights"
            else:
                if plan.bn_output is not None:
                    s0, t0 = plan.bn_output
                    s, t = s0 * s, t0 * s + t
                    plan.bn_stats = None      # two BNs in a row: no single set of statistics to recalibrate
                else:
                    plan.bn_stats = {"gamma": gamma, "beta": beta, "mean": mean, "var": var, "eps": eps,
                                     "bias": plan.bias if plan.bias is not None else np.zeros(plan.cout)}
                plan.bn_output = (s.astype(np.float32), t.astype(np.float32))
                plan.folded_bn = "output"
            out = bn.outputs[0]
            bn.inputs.clear()
            bn.outputs.clear()
            g.nodes.remove(bn)
            plan.y = out
            model.digital_ops = [d for d in model.digital_ops if d["node"] != bn.name]
            emit_layer(g, plan)
            changed = True
        return model, changed
