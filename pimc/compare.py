"""``pimc compare``: accuracies of several `pimc eval` reports side by side."""
from __future__ import annotations

import json
from pathlib import Path

from .core.errors import PimcError
from .evaluate import LABELS, top1_of


def load_report(path) -> dict:
    p = Path(path)
    try:
        r = json.loads(p.read_text())
    except FileNotFoundError:
        raise PimcError(f"report '{p}' not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PimcError(f"report '{p}': not a JSON file ({e}); give `pimc eval --json` outputs")
    if not isinstance(r, dict) or not isinstance(r.get("results"), dict):
        raise PimcError(f"report '{p}': no 'results' table; give `pimc eval --json` outputs")
    return r


def _config_line(r: dict) -> str:
    c = r.get("compile_config", {})
    keys = ("scheme", "weight_bits", "input_bits", "adc_bits", "array_rows", "cell_bits", "adc_range", "fold_bn")
    return " ".join(f"{k}={c[k]}" for k in keys if k in c)


def compare_reports(reports: list[dict], names: list[str]) -> str:
    """Top-1 (%) per result row and report, with the delta of each report against the first."""
    labels = []
    for r in reports:
        labels += [k for k in r["results"] if k not in labels]
    width = max(12, *(len(n) for n in names))
    head = f"{'top-1 %':<32}" + "".join(f" {n[-width:]:>{width}}" for n in names)
    head += "".join(f" {'delta ' + str(i + 1):>10}" for i in range(1, len(reports)))
    lines = [head]
    for label in labels:
        vals = [top1_of(r["results"].get(label)) for r in reports]
        row = f"{LABELS.get(label, label):<32}" + "".join(
            f" {'-' if v is None else f'{100 * v:.2f}':>{width}}" for v in vals)
        for v in vals[1:]:
            d = None if v is None or vals[0] is None else 100 * (v - vals[0])
            row += f" {'-' if d is None else f'{d:+.2f}':>10}"
        lines.append(row)
    lines.append("")
    for i, (n, r) in enumerate(zip(names, reports)):
        d = r.get("data", {})
        lines.append(f"[{i + 1}] {n}: {_config_line(r)}; {d.get('images', '?')} images of {d.get('path', '?')}")
    if len({r.get("data", {}).get("sha256_x") for r in reports}) > 1:
        lines.append("note: the reports were evaluated on different images")
    return "\n".join(lines)
