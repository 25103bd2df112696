"""Compile configuration: defaults, presets, hardware TOML files, validation.

Precedence, lowest first: built-in defaults < ``--preset`` < ``--hw FILE.toml``
< options given explicitly on the command line (or keyword arguments in Python).

The hardware file format is documented in README.md ("Hardware description
files"); its keys are the CLI option names with ``-`` written as ``_``, grouped
in the tables ``[array]``, ``[adc]``, ``[quant]``, ``[mapping]`` and
``[calibration]``.  Inside ``[array]``, ``[adc]`` and ``[calibration]`` the
prefix may be dropped (``rows`` = ``array_rows``, ``bits`` = ``adc_bits``,
``data`` = ``calib_data``).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import PimcError

SCHEMES = ("float", "digital", "native", "differential", "bit-serial", "bit-serial+differential")
TILE_MODES = ("channel", "row")
ADC_RANGES = ("auto", "full", "calibrated")
FOLD_BN = ("weights", "output")


@dataclass(frozen=True)
class CompileConfig:
    """Everything that determines a compiled model.  Recorded in its metadata."""

    scheme: str = "differential"
    adc_bits: int = 6
    array_rows: int = 128
    array_cols: int = 128
    weight_bits: int = 8
    input_bits: int = 8
    cell_bits: int = 0  # weight bits per cell; 0 = the whole weight (or its magnitude) in one cell
    tile_mode: str = "channel"
    adc_range: str = "auto"  # auto: calibrated with real calibration data, else full (see resolved())
    calib_data: str | None = None
    calib_samples: int = 256
    act_calib: str = "mse"   # activation range calibration: max | percentile[:P] | mse | entropy (measured: docs/results/calibration-methods.md)
    adc_calib: str = "mse"   # ADC column range calibration (adc_range calibrated), same methods
    fold_bn: str = "weights"
    seed: int = 0
    chunk_mib: int = 256  # bound on one chunk of per-array partial sums at batch 256
    preset: str | None = None
    digital_layers: str = ""          # comma list of node names/globs, or first/last: kept digital quantized
    layer_overrides: tuple = ()       # the hardware file's [[layer]] tables: {"match": [...], option: value}

    # ---- derived views -------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.scheme != "float"

    @property
    def pim(self) -> bool:
        return self.scheme not in ("float", "digital")

    @property
    def bit_serial_inputs(self) -> bool:
        return self.scheme.startswith("bit-serial")

    @property
    def differential_weights(self) -> bool:
        return self.scheme.endswith("differential")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "CompileConfig":
        known = {f.name for f in dataclasses.fields(CompileConfig)}
        vals = {k: v for k, v in d.items() if k in known}
        if "layer_overrides" in vals:
            vals["layer_overrides"] = tuple({**o, "match": list(o["match"])} for o in (vals["layer_overrides"] or ()))
        return CompileConfig(**vals)

    def replace(self, **kw) -> "CompileConfig":
        return dataclasses.replace(self, **kw)

    def resolved(self, real_calibration: bool | None = None) -> "CompileConfig":
        """This config with ``adc_range="auto"`` made concrete: ``calibrated`` when real
        calibration data is given (``calib_data``, or ``real_calibration``), ``full`` when
        only synthetic inputs exist, and ``full`` for the float and digital schemes (no ADC)."""
        if self.adc_range != "auto":
            return self
        real = self.calib_data is not None if real_calibration is None else real_calibration
        return self.replace(adc_range="calibrated" if real and may_use(self, "pim") else "full")


# Presets: name -> (description, overrides).  N is the number of rows summed per
# ADC conversion (the array height used by channel-aligned 3x3 tiles).
PRESETS: dict[str, tuple[str, dict]] = {
    "pimqat-native": (
        "PIM-QAT native scheme: 4-bit weights and inputs in one cell, N=9 (one 3x3 input channel per conversion), 7-bit ADC",
        dict(scheme="native", array_rows=9, array_cols=128, weight_bits=4, input_bits=4, adc_bits=7, cell_bits=0, tile_mode="channel"),
    ),
    "pimqat-differential": (
        "PIM-QAT differential scheme: 4-bit weights split into positive/negative columns, N=144, 7-bit ADC",
        dict(scheme="differential", array_rows=144, array_cols=128, weight_bits=4, input_bits=4, adc_bits=7, cell_bits=0, tile_mode="channel"),
    ),
    "pimqat-bit-serial": (
        "PIM-QAT bit-serial scheme: 4-bit inputs applied one bit at a time, 4-bit weights, N=144, 7-bit ADC",
        dict(scheme="bit-serial", array_rows=144, array_cols=128, weight_bits=4, input_bits=4, adc_bits=7, cell_bits=0, tile_mode="channel"),
    ),
    "columnquant-128": (
        "ColumnQuant-style: 128-row differential arrays, channel-aligned tiles, column-wise ADC scales calibrated from data, 4-bit weights and inputs, 5-bit ADC",
        dict(scheme="differential", array_rows=128, array_cols=128, weight_bits=4, input_bits=4, adc_bits=5, cell_bits=0, tile_mode="channel", adc_range="calibrated"),
    ),
}

HW_TABLES = ("array", "adc", "quant", "mapping", "calibration", "nonideal")
# options a [[layer]] table (or --digital-layers) may set for the layers it matches
LAYER_KEYS = ("scheme", "adc_bits", "array_rows", "array_cols", "weight_bits", "input_bits", "cell_bits", "tile_mode",
              "adc_range", "act_calib", "adc_calib")
RUNTIME_TABLES = ("nonideal",)  # read by pimc.core.chip, not by the compiler


def _field_types() -> dict[str, type]:
    out = {}
    for f in dataclasses.fields(CompileConfig):
        t = f.type if isinstance(f.type, str) else f.type.__name__
        out[f.name] = int if t.startswith("int") else str
    return out


def read_hw_toml(path: str | Path) -> dict:
    """Parse a hardware description file, or raise a one-line PimcError naming it."""
    p = Path(path)
    if not p.is_file():
        raise PimcError(f"--hw: hardware file '{p}' not found; give the path of a TOML file (format in README.md)")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PimcError(f"--hw: '{p}' is not valid TOML: {e}")


def load_hw_file(path: str | Path) -> dict:
    """Read a hardware description TOML file into config overrides."""
    p = Path(path)
    doc = read_hw_toml(p)
    flat: dict = {}
    for key, val in doc.items():
        if key in RUNTIME_TABLES:
            continue
        if key == "layer":
            flat["layer_overrides"] = _layer_tables(val, p)
            continue
        if isinstance(val, dict):
            if key not in HW_TABLES:
                raise PimcError(f"--hw: '{p}': unknown table [{key}]; known tables: {', '.join(HW_TABLES)}")
            items = val.items()
        else:
            items = [(key, val)]
        prefix = {"array": "array_", "adc": "adc_", "calibration": "calib_"}.get(key if isinstance(val, dict) else "", "")
        for k, v in items:
            k = k.replace("-", "_")
            if prefix and prefix + k in _field_types():
                k = prefix + k
            if k in ("preset",):
                raise PimcError(f"--hw: '{p}': key '{k}' is not allowed in a hardware file; pass --preset on the command line")
            flat[k] = v
    types = _field_types()
    for k, v in flat.items():
        if k == "layer_overrides":
            continue
        if k not in types:
            raise PimcError(f"--hw: '{p}': unknown key '{k}'; known keys: {', '.join(sorted(types))}")
        _check_type(f"--hw: '{p}'", k, v, types[k])
    if "calib_data" in flat:
        flat["calib_data"] = str((p.parent / flat["calib_data"]).resolve()) if not Path(flat["calib_data"]).is_absolute() else flat["calib_data"]
    return flat


def _check_type(where: str, k: str, v, want: type) -> None:
    """A hardware-file value of the type its compile option takes, or a one-line error."""
    if want is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise PimcError(f"{where}: key '{k}' must be an integer, got {v!r}")
    if want is str and not isinstance(v, str):
        raise PimcError(f"{where}: key '{k}' must be a string, got {v!r}")


def _layer_tables(val, p: Path) -> tuple:
    """The [[layer]] tables of hardware file ``p``, checked: each has ``match`` (a node name, glob,
    ``first`` or ``last``, or a list of them) and options from LAYER_KEYS."""
    if not isinstance(val, list) or not all(isinstance(t, dict) for t in val):
        raise PimcError(f"--hw: '{p}': 'layer' must be an array of tables, written [[layer]]")
    types = _field_types()
    out = []
    for i, t in enumerate(val, 1):
        t = {k.replace("-", "_"): v for k, v in t.items()}
        where = f"--hw: '{p}': [[layer]] #{i}"
        m = t.pop("match", None)
        if isinstance(m, str):
            m = [m]
        if not m or not isinstance(m, list) or not all(isinstance(x, str) and x.strip() for x in m):
            raise PimcError(f"{where} needs match = \"NAME-OR-GLOB\" (or a list of them; first and last name the "
                            f"first and last mapped layer)")
        for k, v in t.items():
            if k not in LAYER_KEYS:
                raise PimcError(f"{where}: key '{k}' cannot be set per layer; per-layer keys: {', '.join(LAYER_KEYS)}")
            _check_type(where, k, v, types[k])
        if not t:
            raise PimcError(f"{where} ({', '.join(m)}) sets no option; per-layer keys: {', '.join(LAYER_KEYS)}")
        out.append({"match": [x.strip() for x in m], **t, "where": f"{where} (match {', '.join(m)})"})
    return tuple(out)


def layer_rules(cfg: CompileConfig) -> list[dict]:
    """The per-layer rules in the order they apply (later ones win): the hardware file's
    [[layer]] tables, then ``--digital-layers`` (scheme digital)."""
    rules = [dict(o) for o in cfg.layer_overrides]
    for r in rules:
        r.setdefault("where", f"[[layer]] (match {', '.join(r['match'])})")
    names = [x.strip() for x in cfg.digital_layers.split(",") if x.strip()]
    if names:
        rules.append({"match": names, "scheme": "digital", "where": f"--digital-layers {cfg.digital_layers}"})
    return rules


def rule_matches(pattern: str, name: str, index: int, count: int, weight: str | None = None) -> bool:
    """Whether a [[layer]] / --digital-layers pattern names the mapped layer ``name`` (its
    ``index`` of ``count`` in graph order; ``weight`` its weight initializer's name):
    ``first``, ``last``, or a glob (fnmatch) on the node name or the weight name."""
    from fnmatch import fnmatchcase
    if pattern == "first":
        return index == 0
    if pattern == "last":
        return index == count - 1
    return fnmatchcase(name, pattern) or (weight is not None and fnmatchcase(weight, pattern))


def layer_configs(cfg: CompileConfig, layers: list[tuple[str, str | None]]) -> dict[str, tuple["CompileConfig", list]]:
    """Per mapped layer (name, weight initializer name) in graph order: its CompileConfig after
    the per-layer rules, and the rules that changed it.  A pattern that matches no layer is
    an error (a misspelt name must not silently change nothing)."""
    rules = layer_rules(cfg)
    out = {}
    hits = [[0] * len(r["match"]) for r in rules]
    for i, (name, weight) in enumerate(layers):
        vals, why = {}, []
        for ri, r in enumerate(rules):
            hit = False
            for pi, pat in enumerate(r["match"]):
                if rule_matches(pat, name, i, len(layers), weight):
                    hits[ri][pi] += 1
                    hit = True
            if hit:
                vals.update({k: v for k, v in r.items() if k not in ("match", "where")})
                why.append(r["where"])
        if vals and vals.get("scheme", cfg.scheme) in ("float", "digital"):
            # array options a layer inherits have no effect on a float or digital layer
            vals = {"adc_range": "full", "cell_bits": 0, **vals}
        c = cfg.replace(**vals) if vals else cfg
        if vals:
            try:
                validate(c)
            except PimcError as e:
                raise PimcError(f"layer '{name}' ({'; '.join(why)}): {e}") from None
        out[name] = (c, why)
    for r, h in zip(rules, hits):
        for pat, n in zip(r["match"], h):
            if n == 0:
                ex = ", ".join(n for n, _ in layers[:3]) + (", …" if len(layers) > 3 else "")
                raise PimcError(f"{r['where']}: '{pat}' matches no mapped layer; give a node name or glob "
                                f"(e.g. {ex or 'none mapped'}), a weight name, first or last")
    return out


def may_use(cfg: CompileConfig, what: str) -> bool:
    """Whether any layer may be ``what`` ("quantized" or "pim") under ``cfg`` and its rules
    (decides which passes run)."""
    test = (lambda s: s != "float") if what == "quantized" else (lambda s: s not in ("float", "digital"))
    return test(cfg.scheme) or any(test(r["scheme"]) for r in layer_rules(cfg) if "scheme" in r)


def layered(presets: dict, preset: str | None, option: str, hw_values, explicit: dict) -> dict:
    """Settings in layers: a preset's (``presets[name] = (description, values)``, chosen with
    ``option``) < a hardware file's (``hw_values()``, read only when given) < explicit values
    (None counts as not given).  For compile configs and chip configs alike."""
    values: dict = {}
    if preset is not None:
        if preset not in presets:
            raise PimcError(f"{option}: unknown {option.lstrip('-').replace('-', ' ')} '{preset}'; "
                            f"choose one of: {', '.join(presets)}")
        values.update(presets[preset][1])
    if hw_values is not None:
        values.update(hw_values())
    values.update({k: v for k, v in explicit.items() if v is not None})
    return values


def build_config(preset: str | None = None, hw: str | Path | None = None, **explicit) -> CompileConfig:
    """Merge defaults, a preset, a hardware file and explicit options; validate."""
    values = layered(PRESETS, preset, "--preset", (lambda: load_hw_file(hw)) if hw is not None else None,
                     {**explicit, "preset": preset})
    cfg = CompileConfig.from_dict(values)
    validate(cfg)
    return cfg


def validate(cfg: CompileConfig) -> None:
    """Reject values and combinations that cannot be compiled, naming the option."""
    def need(cond, msg):
        if not cond:
            raise PimcError(msg)

    need(cfg.scheme in SCHEMES, f"--scheme: '{cfg.scheme}' is not a scheme; choose one of: {', '.join(SCHEMES)}")
    need(cfg.tile_mode in TILE_MODES, f"--tile-mode: '{cfg.tile_mode}' is not one of: {', '.join(TILE_MODES)}")
    need(cfg.adc_range in ADC_RANGES, f"--adc-range: '{cfg.adc_range}' is not one of: {', '.join(ADC_RANGES)}")
    need(cfg.fold_bn in FOLD_BN, f"--fold-bn: '{cfg.fold_bn}' is not one of: {', '.join(FOLD_BN)}")
    need(2 <= cfg.weight_bits <= 16, f"--weight-bits: {cfg.weight_bits} is out of range; use 2..16")
    need(1 <= cfg.input_bits <= 16, f"--input-bits: {cfg.input_bits} is out of range; use 1..16")
    need(1 <= cfg.adc_bits <= 16, f"--adc-bits: {cfg.adc_bits} is out of range; use 1..16")
    need(1 <= cfg.array_rows <= 65536, f"--array-rows: {cfg.array_rows} is out of range; use 1..65536")
    need(1 <= cfg.array_cols <= 65536, f"--array-cols: {cfg.array_cols} is out of range; use 1..65536")
    need(cfg.chunk_mib >= 1, f"--chunk-mib: {cfg.chunk_mib} must be at least 1")
    from .calibrators import parse_method
    parse_method(cfg.act_calib, "--act-calib")
    parse_method(cfg.adc_calib, "--adc-calib")
    need(cfg.calib_samples >= 1, f"--calib-samples: {cfg.calib_samples} must be at least 1")
    need(cfg.cell_bits >= 0, f"--cell-bits: {cfg.cell_bits} must be >= 0 (0 = whole weight in one cell)")
    mag = cfg.weight_bits - 1 if cfg.differential_weights else cfg.weight_bits
    need(cfg.cell_bits <= mag, f"--cell-bits: {cfg.cell_bits} exceeds the {mag} bits a "
         f"{'differential weight magnitude' if cfg.differential_weights else 'weight'} has with --weight-bits {cfg.weight_bits}; use 0..{mag}")
    if cfg.scheme == "float":
        # a float compile quantizes nothing; silently ignoring PIM options would mislead
        need(cfg.adc_range != "calibrated", "--adc-range calibrated has no effect with --scheme float; drop it or pick a PIM scheme")
    if cfg.scheme in ("float", "digital"):
        need(cfg.cell_bits == 0, f"--cell-bits has no effect with --scheme {cfg.scheme}; drop it or pick a PIM scheme")
    # exactness of float32 partial sums: |s| must stay below 2^24
    need(cfg.weight_bits + cfg.input_bits <= 24, "--weight-bits + --input-bits must be at most 24 so that float32 partial sums stay exact")
    if cfg.calib_data is not None and not Path(cfg.calib_data).is_file():
        raise PimcError(f"--calib-data: file '{cfg.calib_data}' not found; give a .npy or .npz of preprocessed model inputs")


def describe_presets() -> str:
    return "\n".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
