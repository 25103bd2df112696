"""A frozen plan: per-layer quantization values given by the caller, used as given.

Training (the PIM-QAT hook) learns input scales, weight column scales and ADC steps;
recompiling must keep them, at whatever bit widths the config names, instead of
re-deriving them from calibration data or max-abs.  A :class:`FrozenPlan` maps layer
names (the source node names the mapping records) to :class:`FrozenLayer` values;
each field left ``None`` is planned as usual.

* ``input_scale`` (and optionally ``input_signed``): the step of the layer's quantized
  inputs; without ``input_signed`` the sign comes from the calibration data's range;
* ``weight_scales`` (Cout,): q_w = clip(round(W / s_w), -(2^(b-1)-1), 2^(b-1)-1);
* ``adc_step``, ``adc_zero_point`` (columns,): each array column's Delta and z, in the
  mapping's column order (group, tile, slice, out_channel); given together;
* ``output_rescale``: a factor multiplying the layer's out_scale (PIM-QAT's trained
  rescaling of the converted partial sums), recorded in the mapping.

The JSON form (``to_json`` / ``from_json``) is ``{"layers": {name: {field: value}}}``;
``from_mapping`` takes the values of a compiled model, so that recompiling with them
reproduces its scales bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import PimcError

FIELDS = ("input_scale", "input_signed", "weight_scales", "adc_step", "adc_zero_point", "output_rescale")


@dataclass(frozen=True)
class FrozenLayer:
    input_scale: float | None = None
    input_signed: bool | None = None
    weight_scales: np.ndarray | None = None    # (Cout,) float32
    adc_step: np.ndarray | None = None         # (columns,) float32
    adc_zero_point: np.ndarray | None = None   # (columns,) float32, integer-valued
    output_rescale: float | None = None        # PIM-QAT rescaling factor, multiplies out_scale

    def to_record(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = [float(x) for x in v] if isinstance(v, np.ndarray) else v
        return out


def _layer(name: str, rec: dict, where: str) -> FrozenLayer:
    if not isinstance(rec, dict):
        raise PimcError(f"{where}: layer '{name}' must be a table of {', '.join(FIELDS)}")
    extra = sorted(set(rec) - set(FIELDS))
    if extra:
        raise PimcError(f"{where}: layer '{name}': unknown field(s) {', '.join(extra)}; known: {', '.join(FIELDS)}")
    vals = {}
    try:
        if rec.get("input_scale") is not None:
            s = float(np.float32(rec["input_scale"]))
            if not np.isfinite(s) or s <= 0:
                raise ValueError(f"input_scale must be a positive number, got {rec['input_scale']!r}")
            vals["input_scale"] = s
        if rec.get("output_rescale") is not None:
            r = float(np.float32(rec["output_rescale"]))
            if not np.isfinite(r) or r <= 0:
                raise ValueError(f"output_rescale must be a positive number, got {rec['output_rescale']!r}")
            vals["output_rescale"] = r
        if rec.get("input_signed") is not None:
            if not isinstance(rec["input_signed"], (bool, np.bool_)):
                raise ValueError(f"input_signed must be true or false, got {rec['input_signed']!r}")
            vals["input_signed"] = bool(rec["input_signed"])
        for k in ("weight_scales", "adc_step", "adc_zero_point"):
            if rec.get(k) is not None:
                a = np.asarray(rec[k], dtype=np.float64).reshape(-1)
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"{k} holds a value that is not finite")
                vals[k] = a.astype(np.float32)
    except (TypeError, ValueError) as e:
        raise PimcError(f"{where}: layer '{name}': {e}")
    if ("adc_step" in vals) != ("adc_zero_point" in vals):
        raise PimcError(f"{where}: layer '{name}': give adc_step and adc_zero_point together")
    if "weight_scales" in vals and np.any(vals["weight_scales"] <= 0):
        raise PimcError(f"{where}: layer '{name}': weight_scales must be positive")
    if "adc_step" in vals:
        if np.any(vals["adc_step"] <= 0):
            raise PimcError(f"{where}: layer '{name}': adc_step must be positive")
        if np.any(vals["adc_zero_point"] != np.round(vals["adc_zero_point"])):
            raise PimcError(f"{where}: layer '{name}': adc_zero_point must hold integers")
    return FrozenLayer(**vals)


@dataclass(frozen=True)
class FrozenPlan:
    layers: dict   # layer name -> FrozenLayer

    def get(self, name: str) -> FrozenLayer:
        return self.layers.get(name) or FrozenLayer()

    def to_record(self) -> dict:
        return {"layers": {k: v.to_record() for k, v in self.layers.items()}}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_record(), indent=1) + "\n")

    @staticmethod
    def from_record(rec, where: str = "frozen plan") -> "FrozenPlan":
        if not isinstance(rec, dict) or not isinstance(rec.get("layers"), dict):
            raise PimcError(f"{where}: expected {{\"layers\": {{layer name: {{{', '.join(FIELDS)}}}}}}}")
        return FrozenPlan({str(k): _layer(str(k), v, where) for k, v in rec["layers"].items()})

    @staticmethod
    def from_json(path: str | Path) -> "FrozenPlan":
        try:
            rec = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PimcError(f"--plan: file '{path}' not found")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PimcError(f"--plan: '{path}' is not a JSON plan: {e}")
        return FrozenPlan.from_record(rec, f"--plan '{path}'")

    @staticmethod
    def from_mapping(mapping) -> "FrozenPlan":
        """The values a compiled model (its :class:`~pimc.core.mapping.CompiledMapping`) uses."""
        out = {}
        for L in mapping.layers:
            vals = {}
            if L.input_quant is not None:
                vals.update(input_scale=L.input_quant.scale, input_signed=L.input_quant.signed)
            if L.output_rescale is not None:
                vals["output_rescale"] = L.output_rescale
            if L.weight_quant is not None:
                vals["weight_scales"] = np.asarray(L.weight_quant.scales, np.float32)
            if L.adc is not None:
                vals.update(adc_step=np.asarray(L.adc.step, np.float32),
                            adc_zero_point=np.asarray(L.adc.zero_point, np.float32))
            out[L.name] = FrozenLayer(**vals)
        return FrozenPlan(out)

    def covers(self, name: str, adc: bool) -> bool:
        """Whether layer ``name`` needs no calibration data: its input scale and sign (and, with
        ``adc``, its ADC steps) are all given."""
        f = self.get(name)
        return f.input_scale is not None and f.input_signed is not None and (not adc or f.adc_step is not None)

    def check_layers(self, names, source: str) -> None:
        """Every layer of the plan must be a mapped layer of the model."""
        unknown = [k for k in self.layers if k not in set(names)]
        if unknown:
            shown = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
            raise PimcError(f"--plan: layer(s) {', '.join(repr(u) for u in unknown[:3])} are not crossbar layers of "
                            f"'{source}' (its layers: {shown})")
