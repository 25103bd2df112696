"""Quantize crossbar weights with one symmetric scale per output column.

Accepts: a model after QuantizeActivations.
Guarantees: every crossbar layer gets a WeightQuant: per output channel o,
s_w[o] = max|W[o]| / (2^(b-1)-1) (1 for an all-zero column) and
q_w = clip(round(W / s_w), -(2^(b-1)-1), 2^(b-1)-1), a symmetric range so that
the differential magnitudes fit b-1 bits.  The layer is re-emitted as the
digital quantized layer: ``QuantizeInput`` -> ``Conv(q_x, q_w)`` (an exact
integer accumulator) -> ``Mul(s_x * s_w * bn_scale)`` -> ``Add(bias)``.
This model is *the* digital quantized reference of every PIM compile.
A frozen plan's ``weight_scales`` (``compile_model(plan=...)``) replace s_w as given,
and its ``output_rescale`` multiplies the output scale.
"""
from __future__ import annotations

from pimc.core.errors import PimcError
from pimc.core.mapping import WeightQuant
from pimc.core.planning import quantize_columns
from pimc.lowering import emit_layer
from pimc.model import PimModel
from .base import Transformation


class QuantizeWeights(Transformation):
    name = "quantize_weights"

    def apply(self, model: PimModel):
        changed = False
        for p in model.layers.values():
            cfg = model.layer_config(p.name)
            if not cfg.quantized:
                continue   # a float layer (per-layer rule)
            bits = cfg.weight_bits
            given = model.frozen_layer(p.name).weight_scales
            if given is not None and given.shape != (p.cout,):
                raise PimcError(f"--plan: layer '{p.name}': weight_scales has {given.size} values, the layer has "
                                f"{p.cout} output columns")
            q, s = quantize_columns(p.weight, bits, given)
            p.weight_quant = WeightQuant(bits=bits, q=q, scale=s)
            p.output_rescale = model.frozen_layer(p.name).output_rescale
            emit_layer(model.graph, p)
            changed = True
        return model, changed
