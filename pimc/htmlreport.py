"""HTML report with PNG plots for `pimc eval`, and the `pimc sweep` plot.

Plots use matplotlib (the optional extra ``pimc[report]``; the Agg backend, no
display): accuracy per chip, per-layer SQNR against the digital model, ADC
code-usage histograms.  ``write_html(report, DIR)`` writes ``DIR/index.html``
and its PNGs; the directory is assembled beside DIR and renamed into place, so
a failed run leaves no half-written report.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path

from .core.errors import PimcError
from .evaluate import LABELS


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PimcError("plots need matplotlib: pip install 'pimc[report]'")


def _plt():
    check_available()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_chips(report: dict, path: Path) -> None:
    _save(figure_chips(report), path, dpi=110)


def _save(fig, path, dpi: int) -> None:
    """Save a figure (tight bounding box: legends outside the axes stay in) and close it."""
    plt = _plt()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def figure_chips(report: dict):
    """Accuracy per chip instance: bars per chip, lines for the baselines, legend below the axes."""
    plt = _plt()
    res = report["results"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = {"float": "k-", "digital": "b--", "ideal_pim": "g-."}
    for k, st in styles.items():
        if k in res:
            ax.axhline(100 * res[k]["top1"], linestyle=st[1:], color=st[0], label=f"{LABELS[k]} {100 * res[k]['top1']:.2f}%")
    width = 0.4
    for j, (k, color) in enumerate((("nonideal_pim", "tab:red"), ("nonideal_pim_bn_calibrated", "tab:orange"))):
        if k in res:
            chips = res[k]["chips"]
            xs = [i + (j - 0.5) * width for i in range(len(chips))]
            ax.bar(xs, [100 * c["top1"] for c in chips], width=width, color=color,
                   label=f"{LABELS[k]} (mean {100 * res[k]['top1']['mean']:.2f}%)")
            ax.set_xticks(range(len(chips)), [str(c["chip_seed"]) for c in chips])
    ax.set_xlabel("chip seed")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    # the legend sits below the axes, where it hides no bar
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.set_title("Accuracy per chip instance")
    fig.tight_layout()
    return fig


def _variants(report):
    row = report["layers"][0]
    return [k for k in row if isinstance(row[k], dict)]


def plot_sqnr(report: dict, path: Path) -> None:
    plt = _plt()
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for v in _variants(report):
        ys = [r[v].get("sqnr_db") for r in layers]
        ys = [60.0 if r[v].get("exact") else y for r, y in zip(layers, ys)]
        ax.plot(range(len(layers)), [float("nan") if y is None else y for y in ys], marker="o", label=v)
    ax.set_xticks(range(len(layers)), [str(i) for i in range(len(layers))])
    ax.set_xlabel("layer (index in the table)")
    ax.set_ylabel("SQNR vs digital (dB; exact drawn at 60)")
    ax.legend(fontsize=7)
    ax.set_title("Per-layer output SQNR against the digital quantized model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(report: dict, path: Path) -> None:
    _save(figure_histograms(report), path, dpi=100)


def figure_histograms(report: dict):
    """ADC code usage per layer: a grid of log-scale histograms with one legend."""
    plt = _plt()
    layers = [r for r in report["layers"] if any("code_hist" in r[v] for v in _variants(report))]
    n = len(layers)
    cols = 4
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows + 0.8), squeeze=False)
    from matplotlib.ticker import MaxNLocator
    handles = {}
    for i, (ax, r) in enumerate(zip(axes.ravel(), layers)):
        for v in _variants(report):
            h = r[v].get("code_hist")
            if h:
                (line,) = ax.step(range(len(h)), h, where="mid", linewidth=1.0)
                handles.setdefault(v, line)
        ax.set_yscale("log")
        ax.set_title(r["layer"][-40:], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        if i % cols == 0:
            ax.set_ylabel("conversions", fontsize=8)
        if i >= n - cols:
            ax.set_xlabel("ADC output code", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("ADC code usage per layer (conversions per code, log scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / (2.6 * rows + 0.8)))
    if handles:   # one legend for the whole grid, under the title
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 1 - 0.35 / (2.6 * rows + 0.8)))
    return fig


def plot_sweep(result: dict, path) -> None:
    _save(figure_sweep(result), path, dpi=110)


def figure_sweep(result: dict):
    """Accuracy against ADC bits (integer ticks), one colour per scheme, legend beside the axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    others = [k for k in result["axes"] if k not in ("scheme", "adc_bits")]
    series: dict[tuple, list] = {}
    base_lines = {}
    for p in result["points"]:
        key = (p["axes"]["scheme"],) + tuple(p["axes"][k] for k in others)
        series.setdefault(key, []).append((p["axes"]["adc_bits"], p["results"]))
        base_lines.setdefault("float", p["results"]["float"]["top1"])
    # one colour per scheme, one line style per value of the other axes
    colours = {sc: f"C{i}" for i, sc in enumerate(dict.fromkeys(k[0] for k in series))}
    styles = {rest: ("-", "--", "-.", ":")[i % 4] for i, rest in enumerate(dict.fromkeys(k[1:] for k in series))}
    for key, pts in series.items():
        pts.sort(key=lambda t: t[0])
        name = key[0] + "".join(f", {k}={v}" for k, v in zip(others, key[1:]))
        ax.plot([b for b, _ in pts], [100 * r["ideal_pim"]["top1"] for _, r in pts], marker="o", label=f"{name} (ideal)",
                color=colours[key[0]], linestyle=styles[key[1:]])
        if all("nonideal_pim" in r for _, r in pts):
            ax.errorbar([b for b, _ in pts], [100 * r["nonideal_pim"]["top1"]["mean"] for _, r in pts],
                        yerr=[100 * r["nonideal_pim"]["top1"]["std"] for _, r in pts], marker="x", linestyle=":",
                        color=colours[key[0]], label=f"{name} (chips)")
    if "float" in base_lines:
        ax.axhline(100 * base_lines["float"], color="k", linestyle="--", label="float")
    ax.set_xlabel("ADC bits")
    ax.set_xticks(sorted({int(b) for b in result["axes"]["adc_bits"]}))   # integer resolutions only
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(f"Accuracy vs ADC resolution ({result['data']['images']} images)")
    fig.tight_layout()
    return fig


def _table(headers, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def write_html(report: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    from .io import check_output_path
    check_output_path(out_dir, "--html", directory=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pimc-html-", dir=out_dir.parent))
    try:
        parts = ["<!doctype html><meta charset='utf-8'><title>pimc eval report</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}</style>",
                 "<h1>pimc eval report</h1>"]
        rows = []
        for k, r in report["results"].items():
            if "chips" in r:
                rows.append([LABELS.get(k, k), f"{100 * r['top1']['mean']:.2f} ± {100 * r['top1']['std']:.2f}",
                             f"{100 * r['top5']['mean']:.2f}", f"{len(r['chips'])} chips, min {100 * r['top1']['min']:.2f}, "
                             f"max {100 * r['top1']['max']:.2f}"])
            else:
                rows.append([LABELS.get(k, k), f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}", f"{r['images']} images"])
        parts += ["<h2>Accuracy</h2>", _table(["model", "top-1 %", "top-5 %", ""], rows)]
        if any("chips" in r for r in report["results"].values()):
            plot_chips(report, tmp / "chips.png")
            parts.append("<p><img src='chips.png' alt='accuracy per chip'></p>")
        if report.get("layers"):
            variants = _variants(report)
            lrows = []
            for i, r in enumerate(report["layers"]):
                cells = [i, r["layer"], r.get("conversions_per_inference", "-")]
                for v in variants:
                    x = r[v]
                    cells.append("exact" if x.get("exact") else "-" if x.get("sqnr_db") is None else f"{x['sqnr_db']:.1f}")
                    cells.append("-" if "clip_rate" not in x else f"{100 * x['clip_rate']:.3f}")
                lrows.append(cells)
            heads = ["#", "layer", "conversions / inference"] + [h for v in variants for h in (f"SQNR dB {v}", f"clip % {v}")]
            plot_sqnr(report, tmp / "sqnr.png")
            plot_histograms(report, tmp / "histograms.png")
            parts += [f"<h2>Per layer ({report.get('stats_images')} images)</h2>", _table(heads, lrows),
                      "<p><img src='sqnr.png' alt='per-layer SQNR'></p>",
                      "<p><img src='histograms.png' alt='ADC code histograms' style='max-width:100%'></p>"]
        cfg = {k: report.get(k) for k in ("compile_config", "chip_config", "data", "calibration", "versions", "executor")}
        parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(cfg, indent=1, sort_keys=True))}</pre>"]
        (tmp / "index.html").write_text("\n".join(parts))
        from .io import _umask
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
