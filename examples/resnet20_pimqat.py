"""PIM-QAT on the shared ResNet-20: direct deployment vs retraining on the compiled mapping.

Usage::

    python examples/resnet20_pimqat.py [--rows ROW,ROW,...] [--train-images N] [--epochs E]

Writes docs/results/resnet20-pimqat.json (one entry per row, each saved as it lands, so the
run resumes where it stopped: rows already there are skipped unless --redo) and
docs/results/resnet20-pimqat.md (the table of every row present).  Training uses only
../shared/data/cifar10/train.npz (a seeded subset), calibration its first 512 images, the
evaluation all 10,000 test images (``--test-images``; the top-1 of the first 2,000 is recorded
too).  Each trained model is exported through the normal compiler (pimc.train.export) and
evaluated as the deployed IR in onnxruntime.

Evidence point: W4A4, 144-row channel-aligned arrays, 4-bit ADC, calibrated ADC range (mse
calibration of activations and ADC columns, pimc's default).  ``--calib max`` starts from max
calibration (docs/results/resnet20-pimqat-max.md, the table's first version, evaluated on the
first 2,000 test images); other starting points need their own ``--json``.  ``--adc-lr V``
learns the ADC steps too (pimc train --adc-lr) and writes resnet20-pimqat-adclrV.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from resnet20_cifar import load_resnet20, preprocess  # noqa: E402

import pimc  # noqa: E402
import pimc.train as T  # noqa: E402
from pimc.train.command import chips_top1, predictions  # noqa: E402
from pimc.train.loop import TrainConfig, fit  # noqa: E402
from pimc.core.chip import build_chip_config  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
OUT = HERE.parent / "docs" / "results"
# act_calib/adc_calib come from --calib (default mse, pimc's default: docs/results/calibration-methods.md)
POINT = dict(weight_bits=4, input_bits=4, array_rows=144, tile_mode="channel", adc_range="calibrated")
SCHEMES = ("native", "differential", "bit-serial")

# name -> (scheme, ADC bits, training: None | dict(rescale, train_adc_bits, variability), chips)
ROWS = {
    "float": ("float", None, None, 0),
    "digital-ptq": ("digital", None, None, 0),
    "digital-qat": ("digital", None, dict(rescale=False), 0),
    **{f"{s}-direct": (s, 4, None, 0) for s in SCHEMES},
    **{f"{s}-pimqat": (s, 4, dict(rescale=True), 0) for s in SCHEMES},
    **{f"{s}-pimqat-norescale": (s, 4, dict(rescale=False), 0) for s in SCHEMES},
    "bit-serial-pimqat-adjusted5": ("bit-serial", 4, dict(rescale=True, train_adc_bits=5), 0),
    **{f"{s}-adc3-direct": (s, 3, None, 0) for s in SCHEMES},
    **{f"{s}-adc3-pimqat": (s, 3, dict(rescale=True), 0) for s in SCHEMES},
    "chip7-direct": ("differential", 7, None, 10),
    "chip7-pimqat": ("differential", 7, dict(rescale=True), 10),
    "chip7-variability": ("differential", 7, dict(rescale=True, variability=True), 10),
}


def data(n_train: int, n_test: int, seed: int):
    tr = np.load(SHARED / "cifar10" / "train.npz")
    te = np.load(SHARED / "cifar10" / "test.npz")
    calib = preprocess(tr["x"][:512])
    idx = np.random.default_rng(seed).permutation(len(tr["x"]))[:n_train]
    return calib, preprocess(tr["x"][idx]), tr["y"][idx].astype(np.int64), preprocess(te["x"][:n_test]), \
        te["y"][:n_test].astype(np.int64)


def evaluate(row: dict, model, x, y) -> None:
    """Top-1 of the deployed IR on the evaluation images, and on their first 2,000 (the table's first version)."""
    pred = predictions(model, x)
    row["ideal_top1"] = float((pred == y).mean())
    if len(y) >= 2000:
        row["ideal_top1_first2000"] = float((pred[:2000] == y[:2000]).mean())


def run_row(name: str, d, args) -> dict:
    scheme, adc_bits, training, chips = ROWS[name]
    calib, xtr, ytr, xte, yte = d
    net = load_resnet20(str(SHARED / "models" / "resnet20_cifar10.th"))
    opts = dict(POINT, scheme=scheme, fold_bn="output", act_calib=args.calib, adc_calib=args.calib)
    if adc_bits is not None:
        opts["adc_bits"] = adc_bits
    if scheme in ("float", "digital"):
        opts = {k: v for k, v in opts.items() if k in ("weight_bits", "input_bits", "scheme", "fold_bn", "act_calib")}
        if scheme == "float":
            opts = dict(scheme="float", fold_bn="output")
    t0 = time.time()
    res = T.compile_module(net, [3, 32, 32], calib_inputs={"input": calib}, **opts)
    row = {"row": name, "scheme": scheme, "adc_bits": adc_bits, "compile": opts}
    chip = build_chip_config("pimqat-chip7") if chips else None
    if training is None:
        model = res.model
        evaluate(row, model, xte, yte)
    else:
        variability = training.get("variability", False)
        qm = T.prepare(net, res, rescale=training.get("rescale", False),
                       train_adc_bits=training.get("train_adc_bits"))
        tcfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, scale_lr=args.scale_lr, adc_lr=args.adc_lr,
                           seed=args.train_seed,
                           resample_every=args.resample_every if variability else 0)
        run_cfg = {"row": name, "train_images": len(xtr), "opts": opts, "training": training}
        key = hashlib.sha256(json.dumps([run_cfg, tcfg.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
        state = Path(tempfile.gettempdir()) / f"pimqat-{name}-{key}.state.pt"   # resumes only the same run
        if args.redo:
            state.unlink(missing_ok=True)   # --redo trains afresh (a finished run's state would only be reloaded)
        # a state left by an earlier run of the same configuration (an interrupted row, or the same row in
        # another --json) is resumed: its steps are not in this row's seconds, so the row says so
        hist = fit(qm, xtr, ytr, tcfg, state_path=state, resume=True, chip=chip if variability else None,
                   run_config=run_cfg, log=lambda m: print(m, file=sys.stderr))
        start = hist["resumed_from_step"]
        qm.set_chip(None)
        with tempfile.TemporaryDirectory() as tmp:
            out = T.export(qm, Path(tmp) / "trained.pim.onnx")
        model = out.model
        row["training"] = {**training, **tcfg.to_dict(), "train_images": len(xtr), "steps": hist["steps"],
                           "final_loss": float(np.mean([v for _, v in hist["loss"][-20:]])),
                           **({"resumed_from_step": start} if start else {})}
        evaluate(row, model, xte, yte)
    if chips:
        row["chips"] = chips_top1(model, xte, yte, chip, chips, calib[:256], bncal=False)
        row["chips_bncal"] = chips_top1(model, xte, yte, chip, chips, calib[:256])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def write_md(results: dict, path: Path, calib: str, n_test: int, adc_lr: float, schedule: str = "") -> None:
    def pct(v):
        return "" if v is None else f"{100 * v:.2f}"

    def chipcell(c):
        return "" if not c else f"{pct(c['mean'])} ± {pct(c['std'])} ({pct(c['min'])}-{pct(c['max'])})"
    lines = ["# ResNet-20 (CIFAR-10): direct deployment vs PIM-QAT on the compiled mapping", "",
             f"Generated by `python examples/resnet20_pimqat.py{'' if calib == 'mse' else ' --calib ' + calib}"
             f"{'' if adc_lr == 0 else f' --adc-lr {adc_lr:g}'}{schedule}`; "
             f"{'all 10,000' if n_test == 10000 else f'the first {n_test:,}'} test images; training and calibration",
             f"only from the training set.  W4A4, 144-row channel-aligned arrays, calibrated ADC range ({calib} "
             "calibration of activations and ADC columns).  "
             + (f"ADC steps learned at --adc-lr {adc_lr:g} (relative to their calibrated values).  " if adc_lr else
                "ADC steps fixed at their calibrated values (--adc-lr 0, the default).  ") + "Trained",
             "models are exported with `pimc.train.export` and evaluated as the deployed IR in onnxruntime.", "",
             "| row | scheme | ADC bits | training | top-1 ideal ADC (%) | first 2,000 images (%) "
             "| 10 pimqat-chip7 chips (%) | + BN calibration (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | {ROWS[name][0]} | {ROWS[name][1] or ''} | not run yet | | | | |")
            continue
        t = r.get("training")
        tdesc = "none" if not t else (f"{t['train_images']} images x {t['epochs']} epochs, {t['steps']} steps"
                                      + (", rescale" if t.get("rescale") else "")
                                      + (f", train ADC {t['train_adc_bits']} bits" if t.get("train_adc_bits") else "")
                                      + (", variability-aware" if t.get("variability") else "")
                                      + (f", resumed at step {t['resumed_from_step']}" if t.get("resumed_from_step")
                                         else ""))
        lines.append(f"| {name} | {r['scheme']} | {r['adc_bits'] or ''} | {tdesc} | {pct(r['ideal_top1'])} | "
                     f"{pct(r.get('ideal_top1_first2000', r['ideal_top1'] if n_test == 2000 else None))} | "
                     f"{chipcell(r.get('chips'))} | {chipcell(r.get('chips_bncal'))} |")
    lines += ["", *targets(results)]
    path.write_text("\n".join(lines) + "\n")


def targets(results: dict) -> list[str]:
    """The issue's targets against the rows present: met, or missed by how much."""
    def top(name):
        r = results.get(name)
        return None if r is None else 100 * r["ideal_top1"]

    def verdict(ok):
        return "met" if ok else "MISSED"
    out = ["## Targets", ""]
    qat = top("digital-qat")
    missed = False
    for s in SCHEMES:
        for row, what in ((f"{s}-pimqat", "PIM-QAT"), (f"{s}-pimqat-norescale", "PIM-QAT without rescaling")):
            v = top(row)
            if v is not None and qat is not None:
                missed = missed or qat - v > 1.0
                out.append(f"- {s} {what} within 1.0 point of digital W4A4 QAT ({qat:.2f}): {v:.2f}, "
                           f"{qat - v:.2f} points below: {verdict(qat - v <= 1.0)}"
                           + ("" if qat - v <= 1.0 else f" by {qat - v - 1.0:.2f}"))
        d3, p3 = top(f"{s}-adc3-direct"), top(f"{s}-adc3-pimqat")
        if d3 is not None and p3 is not None:
            out.append(f"- {s}, 3-bit ADC: PIM-QAT {p3:.2f} vs direct {d3:.2f} ({p3 - d3:+.2f}; target +10): "
                       f"{verdict(p3 - d3 >= 10)}")
    losses = {k: v["training"]["final_loss"] for k, v in results.items()
              if v.get("training") and v["adc_bits"] in (None, 4) and "final_loss" in v["training"]}
    if missed and "digital-qat" in losses and len(losses) > 1:
        out.append("  Why the 1-point target is missed: under the same budget the 4-bit-ADC runs end with a higher "
                   "training loss (mean of the last 20 steps: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
                   + "): the 4-bit ADC's error is not trained away under this budget"
                   + (f"; with a 7-bit ADC (chip7-pimqat, differential) PIM-QAT reaches {top('chip7-pimqat'):.2f}, "
                      f"{qat - top('chip7-pimqat'):.2f} points below digital QAT." if "chip7-pimqat" in results else "."))
    r = results.get("chip7-pimqat")
    if r is not None and r.get("chips_bncal"):
        ideal, c = 100 * r["ideal_top1"], r["chips_bncal"]
        gap = ideal - 100 * c["min"]
        out.append(f"- 7-bit chip, PIM-QAT + BN calibration over 10 chips within 2 points of its ideal ADC ({ideal:.2f}):"
                   f" mean {100 * c['mean']:.2f}, min {100 * c['min']:.2f} ({gap:.2f} below): {verdict(gap <= 2.0)}")
    runs = {k: v["seconds"] for k, v in results.items() if v.get("training") and not v["training"].get("resumed_from_step")}
    resumed = [k for k, v in results.items() if v.get("training") and v["training"].get("resumed_from_step")]
    if resumed:
        out.append("- not timed (resumed from an earlier run's training state): " + ", ".join(resumed))
    slow = {k: v for k, v in runs.items() if v > 1800}
    if slow:
        out.append("- training within 30 min per run: missed by " + ", ".join(
            f"{k} {v / 60:.0f} min" for k, v in slow.items()) + " (2 cores; bit-serial runs 4 planes per layer, "
            "and the later rows shared the cores with other work)")
    elif runs:
        k = max(runs, key=runs.get)
        out.append(f"- training within 30 min per run (compile, training, export and evaluation of the row, 2 cores): "
                   f"met, longest {k} {runs[k] / 60:.1f} min")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of rows (default: all)")
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--test-images", type=int, default=10000, help="evaluation: the first N test images")
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--scale-lr", type=float, default=0.001)
    ap.add_argument("--adc-lr", type=float, default=0.0,
                    help="learning rate of the ADC steps relative to their compiled values (pimc train --adc-lr; 0, the "
                         "default: they stay the calibrated ones); another value writes resnet20-pimqat-adclrV.json")
    ap.add_argument("--resample-every", type=int, default=20)
    ap.add_argument("--train-seed", type=int, default=0, help="training order, augmentation and chip draws")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="run rows already in the JSON again")
    ap.add_argument("--calib", default="mse",
                    help="activation and ADC-column calibration of the starting point, as pimc compile's --act-calib "
                         "/ --adc-calib (mse: the table's; max: resnet20-pimqat-max.json)")
    ap.add_argument("--json", type=Path, default=OUT / "resnet20-pimqat.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    given_json = a.json != ap.get_default("json")
    if a.calib == "max" and not given_json:
        a.json = OUT / "resnet20-pimqat-max.json"
    elif a.adc_lr != 0 and not given_json:
        a.json = OUT / f"resnet20-pimqat-adclr{a.adc_lr:g}.json"
    old = json.loads(a.json.read_text()) if a.json.is_file() else {}
    results = old.get("rows", {})
    # the first tables recorded none of these keys (what they were run with, not today's defaults): max
    # calibration, first 2,000 test images, ADC steps fixed, 20,000 training images x 1.5 epochs
    # (before --adc-lr their updates were below float32's resolution: adc_lr 0 in effect)
    for key, have, want in (("calib", old.get("calib", "max"), a.calib),
                            ("test_images", old.get("test_images", 2000), a.test_images),
                            ("adc_lr", old.get("adc_lr", 0.0), a.adc_lr),
                            ("train_images", old.get("train_images", 20000), a.train_images),
                            ("epochs", old.get("epochs", 1.5), a.epochs)):
        if results and have != want:
            raise SystemExit(f"{a.json} holds rows with {key} {have}; give the same or another --json")
    d = data(a.train_images, a.test_images, seed=0)
    for name in a.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        if name in results and not a.redo:
            continue
        print(f"row {name} ...", file=sys.stderr, flush=True)
        results[name] = run_row(name, d, a)
        print(json.dumps({k: v for k, v in results[name].items() if k != "chips"}), flush=True)
        rec = {"rows": results, "versions": {"pimc": pimc.__version__, "torch": torch.__version__,
                                             "python": platform.python_version()},
               "command": " ".join(sys.argv), "calib": a.calib, "test_images": a.test_images, "adc_lr": a.adc_lr,
               "train_images": a.train_images, "epochs": a.epochs}
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        tmp.replace(a.json)
        # the training schedule and output file where they are not the defaults
        schedule = ((f" --train-images {a.train_images}" if a.train_images != ap.get_default("train_images") else "")
                    + (f" --epochs {a.epochs:g}" if a.epochs != ap.get_default("epochs") else "")
                    + (f" --json {a.json}" if given_json else ""))
        write_md(results, a.json.with_suffix(".md"), a.calib, a.test_images, a.adc_lr, schedule)


if __name__ == "__main__":
    main()
