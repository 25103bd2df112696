"""Generate docs/results/calibration-methods.{json,md}: which calibration method to use, measured.

    python examples/calibration_results.py [--shared ../shared] [--limit 2000] [--calib 512]
                                           [--parts digital,adc,targets] [--redo]

On the shared ResNet-20, the first ``--limit`` CIFAR-10 test images, activation and ADC
ranges calibrated on ``--calib`` training images (never test images), 128-row channel-
aligned arrays, ideal ADC, native kernels:

* ``digital``: digital W4A4 and W8A8 with each activation method (max, percentile:99.9,
  percentile:99.99, mse, entropy);
* ``adc``: W4A4 and W8A8, native / differential / bit-serial, ADC 3..8 bits, with each ADC
  method, every layer mapped, activations calibrated with the best digital method of that
  precision;
* ``targets``: the issue's operating points (first and last layers digital).

Every point is saved to the JSON as it lands; a rerun skips the points already there
(``--redo`` recomputes them), so an interrupted run resumes.  Takes about 40 minutes on
2 cores for all parts.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

ACT = ["max", "percentile:99.9", "percentile:99.99", "mse", "entropy"]
ADC = ["max", "percentile:99.99", "mse", "entropy"]
SCHEMES = ["native", "differential", "bit-serial"]
BITS = [3, 4, 5, 6, 7, 8]
PREC = {"W4A4": dict(weight_bits=4, input_bits=4), "W8A8": dict(weight_bits=8, input_bits=8)}
BASE = dict(array_rows=128, array_cols=128, tile_mode="channel", cell_bits=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--parts", default="digital,adc,targets")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args()

    import pimc
    from pimc.datasets import CIFAR_NORMALISATION
    from pimc.evaluate import load_eval_data
    from pimc.io import write_bytes_atomic
    from pimc.runtime.session import open_session, run_batches
    from resnet20_cifar import export_onnx, load_resnet20

    ckpt = a.shared / "data/models/resnet20_cifar10.th"
    if not ckpt.is_file():
        sys.exit(f"needs {ckpt} (the shared data); pass --shared")
    prep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in CIFAR_NORMALISATION.items()}
    x, y, xc, data_rec, calib_rec = load_eval_data(str(a.shared / "data/cifar10/test.npz"), "test",
                                                   str(a.shared / "data/cifar10/train.npz"), "train", prep,
                                                   a.limit, a.calib, 0)
    jpath = a.out / "calibration-methods.json"
    rec = json.loads(jpath.read_text()) if jpath.is_file() else {}
    same = rec.get("data") == data_rec and rec.get("calibration") == calib_rec
    points = rec.get("points", {}) if same and not a.redo else {}
    rec = {"command": "python examples/calibration_results.py", "data": data_rec, "calibration": calib_rec,
           "versions": {"pimc": pimc.__version__, "onnxruntime": __import__("onnxruntime").__version__},
           "points": points}

    def save():
        a.out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(json.dumps(rec, indent=1, sort_keys=True).encode(), jpath)
        write_bytes_atomic(markdown(rec).encode(), a.out / "calibration-methods.md")

    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "resnet20.onnx")
        export_onnx(load_resnet20(str(ckpt)), model)

        def point(key: str, cfg: dict) -> float:
            if key in points:
                return points[key]["top1"]
            t0 = time.perf_counter()
            res = pimc.compile_model(model, calib_inputs=xc, calib_samples=len(xc), **cfg)
            t1 = time.perf_counter()
            sess = open_session(res.model)
            name = sess.get_inputs()[0].name
            out = np.concatenate([o[0] for _, _, o in run_batches(sess, None, {name: x}, 250)])
            top1 = float(np.mean(out.argmax(1) == y))
            points[key] = {"config": cfg, "top1": top1, "compile_s": t1 - t0, "eval_s": time.perf_counter() - t1}
            print(f"{key:<60} {100 * top1:6.2f} %  (compile {t1 - t0:4.1f} s)", flush=True)
            save()
            return top1

        parts = a.parts.split(",")
        best_act = {}
        for prec, pb in PREC.items():
            scores = {m: point(f"digital {prec} act={m}", dict(scheme="digital", **pb, act_calib=m))
                      for m in ACT} if "digital" in parts or "adc" in parts else {}
            if scores:
                best_act[prec] = max(scores, key=lambda m: (scores[m], -ACT.index(m)))
        rec["best_act"] = best_act
        if "adc" in parts:
            for prec, pb in PREC.items():
                for scheme in SCHEMES:
                    for bits in BITS:
                        for m in ADC:
                            point(f"{scheme} {prec} ADC{bits} act={best_act[prec]} adc={m}",
                                  dict(scheme=scheme, adc_bits=bits, **pb, **BASE, adc_range="calibrated",
                                       act_calib=best_act[prec], adc_calib=m))
        if "targets" in parts:
            fl = dict(digital_layers="first,last", adc_range="calibrated", **BASE)
            for act in ("max", "percentile:99.99", "mse"):
                for adc in ("max", "percentile:99.99", "mse"):
                    for name, cfg in (("differential W4A4 ADC4", dict(scheme="differential", adc_bits=4, **PREC["W4A4"])),
                                      ("differential W4A4 ADC6", dict(scheme="differential", adc_bits=6, **PREC["W4A4"])),
                                      ("bit-serial+differential W4A4 ADC4 cells1",
                                       dict(scheme="bit-serial+differential", adc_bits=4, **PREC["W4A4"], cell_bits=1)),
                                      ("differential W8A8 ADC4", dict(scheme="differential", adc_bits=4, **PREC["W8A8"]))):
                        point(f"target {name} first+last digital act={act} adc={adc}",
                              {**fl, **cfg, "act_calib": act, "adc_calib": adc})
        save()
    print(markdown(rec))


def markdown(rec: dict) -> str:
    P = rec["points"]
    pct = lambda k: f"{100 * P[k]['top1']:.2f}" if k in P else "–"
    n, c = rec["data"]["images"], rec["calibration"]["images"]
    lines = ["# Calibration methods on ResNet-20 / CIFAR-10 (generated)", "",
             f"Generated by `{rec['command']}`; every point, config and version is in `calibration-methods.json`. "
             f"First {n} test images; activation and ADC ranges calibrated on {c} training images; 128-row "
             f"channel-aligned arrays, one cell per weight, ideal ADC; top-1 %.", "",
             "## Digital quantized model: activation calibration (`--act-calib`)", "",
             "| precision | " + " | ".join(ACT) + " |", "|---|" + "---|" * len(ACT)]
    for prec in PREC:
        lines.append(f"| {prec} | " + " | ".join(pct(f"digital {prec} act={m}") for m in ACT) + " |")
    best = rec.get("best_act", {})
    lines += ["", "## ADC column calibration (`--adc-calib`), every layer mapped", "",
              "Activations calibrated with the best method of the table above for that precision "
              f"({', '.join(f'{k}: {v}' for k, v in best.items())}).  Best per point in bold.", ""]
    for prec in PREC:
        if prec not in best:
            continue
        lines += [f"### {prec}", "", "| scheme | ADC method | " + " | ".join(f"ADC {b}" for b in BITS) + " |",
                  "|---|---|" + "---|" * len(BITS)]
        for scheme in SCHEMES:
            keys = {(m, b): f"{scheme} {prec} ADC{b} act={best[prec]} adc={m}" for m in ADC for b in BITS}
            top = {b: max((P[keys[m, b]]["top1"] for m in ADC if keys[m, b] in P), default=None) for b in BITS}
            for m in ADC:
                cells = []
                for b in BITS:
                    k = keys[m, b]
                    cells.append(("**" + pct(k) + "**") if k in P and P[k]["top1"] == top[b] else pct(k))
                lines.append(f"| {scheme} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    wins = {}
    for k, v in P.items():
        if k.startswith(("native", "differential", "bit-serial")) and " adc=" in k:
            grp = k.rsplit(" adc=", 1)[0]
            wins.setdefault(grp, []).append((v["top1"], k.rsplit(" adc=", 1)[1]))
    if wins:
        tally = {}
        mean = {}
        for grp, lst in wins.items():
            b = max(lst)[0]
            for t, m in lst:
                mean.setdefault(m, []).append(b - t)
                if t == b:
                    tally[m] = tally.get(m, 0) + 1
        lines += ["Per ADC method over all scheme / precision / ADC-bit points: points where it is best (ties "
                  "count for each), mean and worst distance to the best method of the point (points).", "",
                  "| ADC method | best at | mean gap | worst gap |", "|---|---|---|---|"]
        for m in ADC:
            if m in mean:
                lines.append(f"| {m} | {tally.get(m, 0)} of {len(wins)} | {100 * np.mean(mean[m]):.2f} | "
                             f"{100 * np.max(mean[m]):.2f} |")
        lines.append("")
    tk = sorted(k for k in P if k.startswith("target "))
    if tk:
        lines += ["## Operating points with the first and last layers digital (`--digital-layers first,last`)", "",
                  "| point | act | ADC | top-1 |", "|---|---|---|---|"]
        for k in tk:
            name, rest = k[len("target "):].split(" first+last digital ")
            act, adc = (s.split("=", 1)[1] for s in rest.split())
            lines.append(f"| {name} | {act} | {adc} | {pct(k)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
