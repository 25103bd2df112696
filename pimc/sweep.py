"""``pimc sweep``: accuracy over a grid of schemes x ADC bits x other compile options.

Float and digital baselines are compiled and evaluated once per distinct
quantization (they do not depend on the scheme or the ADC) and shared between
the points; every point is a full `pimc eval` record (config, results).
"""
from __future__ import annotations

import itertools

from .core.config import SCHEMES, CompileConfig
from .core.errors import PimcError
from .evaluate import _versions, evaluate, load_eval_data, top1_of

PIM_SCHEMES = [s for s in SCHEMES if s not in ("float", "digital")]


def _ints_or_str(v: str):
    try:
        return int(v)
    except ValueError:
        return v


def parse_grid(schemes: str, adc_bits: str, grid: tuple[str, ...]) -> dict[str, list]:
    axes = {"scheme": [s.strip() for s in schemes.split(",") if s.strip()]}
    bad = [s for s in axes["scheme"] if s not in PIM_SCHEMES]
    if bad or not axes["scheme"]:
        raise PimcError(f"--schemes: {', '.join(bad) or 'empty'}: choose from {', '.join(PIM_SCHEMES)}")
    try:
        axes["adc_bits"] = [int(b) for b in adc_bits.split(",")]
    except ValueError:
        raise PimcError(f"--adc-bits-list: '{adc_bits}' is not a comma list of integers")
    fields = set(CompileConfig.__dataclass_fields__) - {"scheme", "adc_bits", "calib_data", "preset"}
    for g in grid:
        key, _, vals = g.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields or not vals:
            raise PimcError(f"--grid: '{g}' is not KEY=V1,V2 with KEY one of: {', '.join(sorted(fields))}")
        axes[key] = [_ints_or_str(v.strip()) for v in vals.split(",")]
    return axes


def sweep(model: str, data: str, base: CompileConfig, axes: dict[str, list], *, split="test", calib_data=None,
          calib_split="train", prep=None, limit=None, log=None, **eval_kw) -> dict:
    prep = prep or {}
    loaded = load_eval_data(data, split, calib_data, calib_split, prep, limit, base.calib_samples, base.seed)
    keys = list(axes)
    cache: dict = {}
    points = []
    combos = list(itertools.product(*(axes[k] for k in keys)))
    for i, combo in enumerate(combos):
        cfg = base.replace(**dict(zip(keys, combo)))
        if log:
            log(f"sweep point {i + 1}/{len(combos)}: " + ", ".join(f"{k}={v}" for k, v in zip(keys, combo)))
        rep = evaluate(model, data, cfg, split=split, calib_data=calib_data, calib_split=calib_split, prep=prep,
                       limit=limit, log=log, cache=cache, loaded=loaded, **eval_kw)
        points.append({"axes": dict(zip(keys, combo)), **{k: rep[k] for k in rep if k not in ("versions", "data",
                                                                                              "calibration")}})
    return {"versions": _versions(), "axes": axes, "base_config": base.to_dict(), "data": loaded[3],
            "calibration": loaded[4], "points": points}


def sweep_table(result: dict) -> str:
    keys = list(result["axes"])
    cols = ["float", "digital", "ideal_pim", "nonideal_pim", "nonideal_pim_bn_calibrated"]
    present = [c for c in cols if any(c in p["results"] for p in result["points"])]
    lines = ["  ".join(f"{k:>14}" for k in keys) + "  " + "  ".join(f"{c[:24]:>24}" for c in present)]
    for p in result["points"]:
        vals = [top1_of(p["results"].get(c)) for c in present]
        lines.append("  ".join(f"{str(p['axes'][k]):>14}" for k in keys) + "  " +
                     "  ".join(f"{'-' if v is None else f'{100 * v:.2f}':>24}" for v in vals))
    lines.append(f"top-1 % on {result['data']['images']} images of {result['data']['path']} "
                 f"(split {result['data']['split']})")
    return "\n".join(lines)


def write_sweep_plot(result: dict, path) -> None:
    """Accuracy against ADC bits, one line per scheme (and per other grid value)."""
    from .htmlreport import plot_sweep
    plot_sweep(result, path)

