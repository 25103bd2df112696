"""The chip model: non-ideal ADC and device models drawn from one seed (pure: configs
and arrays; ``pimc.runtime.chip.instantiate`` writes a chip's draws into a compiled model).

A chip instance is a compiled PIM IR model with every static draw made:

* per ADC (array column): gain g ~ N(1, gain_sigma), offset o ~ N(0, offset_sigma) LSB;
* per weight cell: conductance variation G' = G * exp(theta_chip + theta_cell),
  theta_chip ~ N(0, device_sigma_chip^2) once per chip (``device_scope = "chip"``)
  or once per layer (``"layer"``), theta_cell ~ N(0, device_sigma_cell^2) per cell
  (Deng and Orshansky, DATE 2022); a zero cell stays zero;
* the ADC transfer curve: a monotone lookup table over the 2^b codes, loaded from
  a CSV of a measured curve (``lut_csv``) or synthetic with a given INL:
  lut[k] = k + inl * sin(pi * k / (2^b - 1)) (a bow; INL = max |lut[k] - k|).

and the dynamic one left to the op: thermal noise n ~ N(0, noise_sigma) LSB per
conversion, from a counter-based hash (``formulas.thermal_noise``), so that

    code = clip(round(f_NL(g * s / Delta + o + z) + n), 0, 2^b - 1),   y = (code - z) * Delta

Static draws come from ``numpy.random.default_rng([chip_seed, layer_index, k])``
over each layer's full column and cell arrays (independent of batch size and
of chunking); the same seed gives the same chip, bit for bit.  Defaults are the
PIM-QAT 7-bit prototype chip (gain N(1, 0.024), offset N(0, 2.04) LSB).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import layered, read_hw_toml
from .errors import PimcError
from .formulas import mix32

CHIP_PRESETS = {
    "pimqat-chip7": ("PIM-QAT 7-bit prototype chip: ADC gain N(1, 0.024), offset N(0, 2.04) LSB per column",
                     dict(adc="nonideal", gain_sigma=0.024, offset_sigma=2.04, noise_sigma=0.0, inl=0.0)),
    "ideal": ("ideal ADC, ideal cells", dict(adc="ideal")),
}


@dataclass(frozen=True)
class ChipConfig:
    adc: str = "ideal"              # "ideal" | "nonideal"
    chip_seed: int = 0
    gain_sigma: float = 0.024
    offset_sigma: float = 2.04      # LSB
    noise_sigma: float = 0.0        # LSB, per conversion
    inl: float = 0.0                # LSB, synthetic transfer-curve bow
    lut_csv: str | None = None      # measured transfer curve (overrides inl)
    device_sigma_cell: float = 0.0
    device_sigma_chip: float = 0.0
    device_scope: str = "chip"      # "chip" | "layer"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def ideal(self) -> bool:
        return self.adc == "ideal" and self.device_sigma_cell == 0 and self.device_sigma_chip == 0


def build_chip_config(preset: str | None = None, hw: str | Path | None = None, **explicit) -> ChipConfig:
    """Defaults < chip preset < ``[nonideal]`` table of a --hw file < explicit values."""
    vals = layered(CHIP_PRESETS, preset, "--chip-preset", (lambda: load_hw_nonideal(hw)) if hw is not None else None,
                   explicit)
    fields = {f.name: f for f in dataclasses.fields(ChipConfig)}
    for k in vals:
        if k not in fields:
            raise PimcError(f"unknown chip setting '{k}'; known: {', '.join(fields)}")
    cfg = ChipConfig(**vals)
    if cfg.adc not in ("ideal", "nonideal"):
        raise PimcError(f"--adc: '{cfg.adc}' is not one of: ideal, nonideal")
    if cfg.device_scope not in ("chip", "layer"):
        raise PimcError(f"device_scope: '{cfg.device_scope}' is not one of: chip, layer")
    for k in ("gain_sigma", "offset_sigma", "noise_sigma", "inl", "device_sigma_cell", "device_sigma_chip"):
        if getattr(cfg, k) < 0:
            raise PimcError(f"--{k.replace('_', '-')}: must be >= 0, got {getattr(cfg, k)}")
    if cfg.lut_csv is not None and not Path(cfg.lut_csv).is_file():
        raise PimcError(f"--adc-lut: file '{cfg.lut_csv}' not found")
    return cfg


def load_hw_nonideal(path) -> dict:
    p = Path(path)
    t = read_hw_toml(p).get("nonideal", {})
    if not isinstance(t, dict):
        raise PimcError(f"--hw: '{p}': [nonideal] must be a table")
    out = {}
    types = {f.name: f.type for f in dataclasses.fields(ChipConfig)}
    for k, v in t.items():
        k = k.replace("-", "_")
        if k not in types:
            raise PimcError(f"--hw: '{p}': unknown key '{k}' in [nonideal]; known: {', '.join(types)}")
        if "float" in str(types[k]) and not isinstance(v, (int, float)):
            raise PimcError(f"--hw: '{p}': [nonideal] {k} must be a number, got {v!r}")
        out[k] = float(v) if "float" in str(types[k]) else v
    if "lut_csv" in out and not Path(out["lut_csv"]).is_absolute():
        out["lut_csv"] = str((p.parent / out["lut_csv"]).resolve())
    return out


def transfer_lut(cfg: ChipConfig, bits: int) -> np.ndarray:
    L = 2 ** bits
    if cfg.lut_csv:
        lut = read_lut_csv(cfg.lut_csv)
        if lut.shape[0] != L:
            raise PimcError(f"--adc-lut: '{cfg.lut_csv}' holds {lut.shape[0]} levels, the {bits}-bit ADC needs {L}")
        return lut
    k = np.arange(L, dtype=np.float64)
    return (k + cfg.inl * np.sin(np.pi * k / max(L - 1, 1))).astype(np.float32)


def read_lut_csv(path) -> np.ndarray:
    """A measured transfer curve: one level per line, or ``code,level`` rows (a header row is skipped).

    Level k is where the ideal code k lands on the converter's input axis, in LSB.
    The curve must be increasing.
    """
    rows = []
    try:
        with open(path, newline="") as f:
            for r in csv.reader(f):
                r = [c.strip() for c in r if c.strip()]
                if not r:
                    continue
                try:
                    rows.append([float(c) for c in r])
                except ValueError:
                    if rows:
                        raise
    except (OSError, ValueError) as e:
        raise PimcError(f"--adc-lut: '{path}' is not a CSV of numbers: {e}")
    if not rows:
        raise PimcError(f"--adc-lut: '{path}' holds no levels")
    lut = np.array([r[-1] for r in rows], np.float32)
    if len(rows[0]) >= 2:
        order = np.argsort([r[0] for r in rows])
        lut = lut[order]
    if np.any(np.diff(lut) <= 0):
        raise PimcError(f"--adc-lut: '{path}': the transfer curve must be strictly increasing")
    return lut


@dataclass(frozen=True)
class LayerDraw:
    """One chip's static draws for one mapped layer (arrays, no graph): per array column
    the ADC gain and offset (non-ideal ADC), the log conductance factor of every cell
    (device variation; ``None`` without), and per chunk of columns the noise seed."""
    gain: np.ndarray | None            # (columns,) float32
    offset: np.ndarray | None          # (columns,) float32, LSB
    log_factor: np.ndarray | float | None   # (columns, rows, kh, kw) float64 theta, a scalar, or None
    noise_seeds: tuple[int, ...]       # one per chunk


def draw_layer(chip: ChipConfig, layer_index: int, columns: int, cell_shape: tuple[int, int, int],
               chunks: int) -> LayerDraw:
    """The static draws of chip ``chip`` for the mapped layer ``layer_index`` (its position in the
    mapping) with ``columns`` array columns of ``cell_shape`` = (rows per tile, kh, kw) cells each:
    a pure function of its arguments (every draw from ``numpy.random.default_rng`` seeded by
    ``[chip_seed, layer_index, ...]``).  ``instantiate`` writes these into the IR; training samples
    chips through the same call."""
    nonideal = chip.adc == "nonideal"
    rng = np.random.default_rng([chip.chip_seed, layer_index])
    gain = rng.normal(1.0, chip.gain_sigma, columns).astype(np.float32) if nonideal else None
    offset = rng.normal(0.0, chip.offset_sigma, columns).astype(np.float32) if nonideal else None
    theta = None
    if chip.device_sigma_chip > 0:
        theta = (np.random.default_rng([chip.chip_seed, layer_index, 1]) if chip.device_scope == "layer" else
                 np.random.default_rng([chip.chip_seed, 2 ** 20])).normal(0.0, chip.device_sigma_chip)
    if chip.device_sigma_cell > 0:
        cell = np.random.default_rng([chip.chip_seed, layer_index, 2]).normal(0.0, chip.device_sigma_cell,
                                                                               (columns, *cell_shape))
        theta = cell if theta is None else theta + cell
    seeds = tuple(int(mix32(np.int64(chip.chip_seed) * 1000003 + layer_index * 7919 + ci * 104729)) & 0x7FFFFFFF
                  for ci in range(chunks))
    return LayerDraw(gain=gain, offset=offset, log_factor=theta, noise_seeds=seeds)
