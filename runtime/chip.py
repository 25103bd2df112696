"""Chip instances in the IR: ``instantiate`` writes one chip's static draws (made by
:func:`pimc.core.chip.draw_layer`, where the chip model is documented) into a copy of a
compiled model and swaps its ideal ADC ops for the non-ideal ones."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pimc.core import names as N
from pimc.core.chip import ChipConfig, draw_layer, transfer_lut
from pimc.core.errors import PimcError
from pimc.core.mapping import read_mapping
from .ops import DOMAIN, function_protos


def instantiate(model: onnx.ModelProto, chip: ChipConfig, source: str = "model") -> onnx.ModelProto:
    """A copy of a compiled model with this chip's static draws (``draw_layer``) and non-ideal ADC ops."""
    mapping = read_mapping(model, source)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if chip.ideal:
        return out
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    luts = {}
    used: set[str] = set()
    for li, L in enumerate(mapping.layers):
        if L.adc is None:
            continue
        bits = L.adc.bits
        chunks = L.chunk_list
        draw = draw_layer(chip, li, L.adc.columns, (L.tiling.channels_per_tile, *L.kernel), len(chunks))
        for ci, chunk in enumerate(chunks):
            sfx = chunk.suffix
            cols = L.chunk_columns(chunk)
            if draw.log_factor is not None:
                t = inits[N.tensor(L.name, N.ARRAY_WEIGHT, sfx)]
                w = numpy_helper.to_array(t).astype(np.float64)
                lf = draw.log_factor
                factor = np.exp(lf[cols][:, :w.shape[1]] if np.ndim(lf) else lf)
                t.CopyFrom(numpy_helper.from_array((w * factor).astype(np.float32), t.name))
            if chip.adc != "nonideal":
                continue
            node = nodes.get(N.node(L.name, N.ADC, sfx))
            if node is None or node.op_type not in N.NONIDEAL_OP:
                raise PimcError(f"'{source}': layer '{L.name}' has no ideal ADC node '{N.node(L.name, N.ADC, sfx)}'; "
                                f"recompile it with this pimc version")
            if bits not in luts:
                luts[bits] = N.chip_lut(bits)
                out.graph.initializer.append(numpy_helper.from_array(transfer_lut(chip, bits), luts[bits]))
            g_name, o_name = N.tensor(L.name, N.CHIP_GAIN, sfx), N.tensor(L.name, N.CHIP_OFFSET, sfx)
            out.graph.initializer.extend([
                numpy_helper.from_array(draw.gain[cols].reshape(1, -1, 1, 1), g_name),
                numpy_helper.from_array(draw.offset[cols].reshape(1, -1, 1, 1), o_name)])
            extra = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "bits"}
            new = helper.make_node(N.NONIDEAL_OP[node.op_type],
                                   [*node.input[:3], g_name, o_name, luts[bits], *node.input[3:]],
                                   list(node.output), name=node.name, domain=DOMAIN, bits=bits,
                                   noise_sigma=float(chip.noise_sigma), seed=draw.noise_seeds[ci], **extra)
            node.CopyFrom(new)
            used.add(new.op_type)
    have = {f.name for f in out.functions}
    missing = [f for f in function_protos(sorted(used)) if f.name not in have]
    out.functions.extend(missing)
    out.metadata_props.add(key="pimc.chip", value=chip.to_json())
    return out
