"""Per-layer figures of a compiled model against the digital model, for reports.

For each crossbar layer, on a few images:

* ``sqnr_db``: signal-to-quantization-noise ratio of the layer's output against
  the digital quantized model's output for the same images,
  ``10 log10(sum d^2 / sum (p - d)^2)`` (``None`` with ``exact: true`` where they
  are identical); the error accumulates through the network, as on a chip;
* ``clip_rate``: the fraction of ADC conversions whose noise-free code
  ``round(gain * s / scale + offset + zero_point)`` (gain 1, offset 0 on the
  ideal ADC) falls outside ``[0, 2^bits - 1]`` and is clipped;
* ``code_hist``: how often each of the ``2^bits`` output codes (noise-free,
  after clipping) is used;
* ``conversions_per_inference``: ADC conversions per input image, counted from
  the partial-sum tensors themselves.

The partial sums are read by adding the ADC nodes' inputs as model outputs;
images are processed in small batches (``batch``) to bound that memory.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .bncal import input_name, with_outputs
from .core import names as N


def adc_nodes(model: onnx.ModelProto, mapping) -> dict[str, list[dict]]:
    """Per layer name: its ADC nodes' partial-sum tensor and parameters, one per chunk of the
    layer's columns (nodes found by their names; step and zero point from the mapping, a chip's
    gain, offset and transfer curve from the instantiated IR)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    const = lambda n: numpy_helper.to_array(inits[n]).astype(np.float32) if n in inits else None
    out: dict[str, list[dict]] = {}
    for L in mapping.layers:
        if L.adc is None:
            continue
        for chunk in L.chunk_list:
            n = nodes.get(N.node(L.name, N.ADC, chunk.suffix))
            if n is None or not N.is_adc(n):
                continue
            nonideal = n.op_type not in N.NONIDEAL_OP
            cols = L.chunk_columns(chunk)   # step and zero point from the mapping; the chip's draws from the IR
            out.setdefault(L.name, []).append({
                "s": n.input[0], "bits": L.adc.bits,
                "scale": np.asarray(L.adc.step, np.float32)[cols].reshape(1, -1, 1, 1),
                "zero_point": np.asarray(L.adc.zero_point, np.float32)[cols].reshape(1, -1, 1, 1),
                "gain": const(n.input[3]) if nonideal else None, "offset": const(n.input[4]) if nonideal else None,
                "lut": const(n.input[5]) if nonideal else None})
    return out


def _codes(s: np.ndarray, a: dict) -> np.ndarray:
    """Noise-free output codes before clipping (``formulas.adc_code``: gain, offset and the
    transfer curve on a chip)."""
    from .core.formulas import adc_code
    return adc_code(s, a["scale"], a["zero_point"], a["gain"], a["offset"], a["lut"])


def layer_stats(digital: onnx.ModelProto, pim: onnx.ModelProto, mapping, x: np.ndarray,
                batch: int = 8, progress=None) -> list[dict]:
    """Per-layer figures of ``pim`` (a compiled model, chip already instantiated)
    against ``digital`` on images ``x``; ``progress(n)`` is called after every n images."""
    from pimc.runtime.session import open_session, run_batches

    produced = lambda m: {o for n in m.graph.node for o in n.output}
    both = produced(digital) & produced(pim)
    layers = [L for L in mapping.layers if L.output in both]
    adcs = adc_nodes(pim, mapping)
    outs = [L.output for L in layers]
    s_names = [a["s"] for L in layers for a in adcs.get(L.name, [])]
    d_sess = open_session(with_outputs(digital, outs))
    p_sess = open_session(with_outputs(pim, outs + s_names))
    name = input_name(pim)
    acc = {L.name: {"sig": 0.0, "err": 0.0, "clip": 0, "conv": 0,
                       "hist": None} for L in layers}
    for (_, rows, d_out), (_, _, p_out) in zip(run_batches(d_sess, outs, {name: x}, batch),
                                            run_batches(p_sess, outs + s_names, {name: x}, batch)):
        d = dict(zip(outs, d_out))
        p = dict(zip(outs + s_names, p_out))
        if progress is not None:
            progress(rows)
        for L in layers:
            a = acc[L.name]
            dv, pv = d[L.output].astype(np.float64), p[L.output].astype(np.float64)
            a["sig"] += float(np.sum(dv * dv))
            a["err"] += float(np.sum((pv - dv) ** 2))
            for adc in adcs.get(L.name, []):
                top = 2 ** adc["bits"] - 1
                code = _codes(p[adc["s"]], adc)
                a["clip"] += int(np.count_nonzero((code < 0) | (code > top)))
                a["conv"] += code.size
                h = np.bincount(np.clip(code, 0, top).astype(np.int64).ravel(), minlength=top + 1)
                a["hist"] = h if a["hist"] is None else a["hist"] + h
    rows = []
    for L in layers:
        a = acc[L.name]
        exact = a["err"] == 0.0
        rec = {"layer": L.name, "sqnr_db": None if exact or a["sig"] == 0 else
               float(10 * np.log10(a["sig"] / a["err"])), "exact": exact}
        if a["conv"]:
            rec.update(adc_bits=L.adc.bits, clip_rate=a["clip"] / a["conv"],
                       code_hist=[int(v) for v in a["hist"]], conversions_per_inference=a["conv"] // len(x))
        rows.append(rec)
    return rows
