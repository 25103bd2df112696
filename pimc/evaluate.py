"""``pimc eval``: float vs digital vs ideal PIM vs non-ideal PIM chips on the same images.

Calibration (activation and ADC ranges) always comes from a separate split —
by default the training split of the same data set — never from the
evaluation images; the report records which.  The report (a dict, written as
JSON by the CLI) holds the full compile and chip configs, the versions, the
seeds, the data set's fingerprint and every figure, so any figure can be
regenerated.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .config import CompileConfig
from .datasets import load_images, preprocess
from .errors import PimcError


def _versions() -> dict:
    import onnx
    import onnxruntime
    return {"pimc": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def topk(logits: np.ndarray, y: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int(np.sum(np.any(top == y[:, None], axis=1)))


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    if not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)


def run_model(sess, x: np.ndarray, y: np.ndarray, batch: int, desc: str, log) -> dict:
    name = sess.get_inputs()[0].name
    bar = _progress(len(x), desc)
    c1 = c5 = 0
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        out = sess.run(None, {name: x[i:i + batch]})[0]
        c1 += topk(out, y[i:i + batch], 1)
        c5 += topk(out, y[i:i + batch], 5)
        if bar is not None:
            bar.update(len(out))
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    if log:
        log(f"{desc}: {len(x)} images in {dt:.1f} s")
    return {"top1": c1 / len(x), "top5": c5 / len(x), "correct_top1": c1, "images": len(x), "seconds": dt}


def evaluate(model: str, data: str, config: CompileConfig, *, chip=None, chips: int = 0, split: str = "test",
             calib_data: str | None = None, calib_split: str = "train", prep: dict | None = None,
             limit: int | None = None, batch: int = 256, log=None) -> dict:
    from .pipeline import compile_model
    from pimc.runtime.chip import ChipConfig, build_chip_config
    from pimc.runtime.session import open_session

    prep = prep or {}
    x_u8, y = load_images(data, split)
    if limit:
        x_u8, y = x_u8[:limit], y[:limit]
    calib_path = calib_data or data
    if Path(calib_path).resolve() == Path(data).resolve() and calib_split == split:
        raise PimcError(f"calibration would read the evaluation images ('{data}', split {split}); "
                        f"use --calib-split train or another --calib-data")
    try:
        xc_u8, _ = load_images(calib_path, calib_split)
    except PimcError as e:
        raise PimcError(f"calibration data: {e}; give --calib-data with training images")
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.permutation(len(xc_u8))[: config.calib_samples])
    x = preprocess(x_u8, **prep)
    xc = preprocess(xc_u8[pick], **prep)
    report = {
        "versions": _versions(), "compile_config": config.to_dict(),
        "data": {"path": str(data), "split": split, "images": int(len(x)),
                 "sha256_x": hashlib.sha256(np.ascontiguousarray(x_u8).tobytes()).hexdigest(),
                 "preprocess": prep},
        "calibration": {"path": str(calib_path), "split": calib_split, "images": int(len(xc)),
                        "indices_seed": config.seed},
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cpath = Path(tmp) / "calib.npy"
        np.save(cpath, xc)
        cfg = config.replace(calib_data=str(cpath))
        digital = cfg.replace(scheme="digital", adc_range="full", cell_bits=0)
        runs = [("float", config.replace(scheme="float", adc_range="full", cell_bits=0, calib_data=None)),
                ("digital", digital)]
        if cfg.pim:
            runs.append(("ideal_pim", cfg))
        compiled = {}
        for label, c in runs:
            res = compile_model(model, c)
            compiled[label] = res.model
            report["results"][label] = run_model(open_session(res.model), x, y, batch, label, log)
        if cfg.pim and chips > 0:
            base = chip if isinstance(chip, ChipConfig) else build_chip_config(adc="nonideal")
            per_chip = []
            for k in range(chips):
                ck = ChipConfig(**{**asdict(base), "chip_seed": base.chip_seed + k})
                r = run_model(open_session(compiled["ideal_pim"], ck), x, y, batch, f"chip {ck.chip_seed}", log)
                r["chip_seed"] = ck.chip_seed
                per_chip.append(r)
            t1 = np.array([r["top1"] for r in per_chip])
            t5 = np.array([r["top5"] for r in per_chip])
            report["chip_config"] = asdict(base)
            report["results"]["nonideal_pim"] = {
                "chips": per_chip,
                "top1": {"mean": float(t1.mean()), "std": float(t1.std()), "min": float(t1.min()), "max": float(t1.max())},
                "top5": {"mean": float(t5.mean()), "std": float(t5.std()), "min": float(t5.min()), "max": float(t5.max())},
            }
    return report


def report_table(report: dict) -> str:
    lines = [f"{'model':<28} {'top-1':>8} {'top-5':>8} {'images':>8}"]
    for label, r in report["results"].items():
        if label == "nonideal_pim":
            t1, t5 = r["top1"], r["top5"]
            lines.append(f"{'non-ideal PIM (' + str(len(r['chips'])) + ' chips)':<28} {100 * t1['mean']:>7.2f}% "
                         f"{100 * t5['mean']:>7.2f}% {r['chips'][0]['images']:>8}   "
                         f"top-1 std {100 * t1['std']:.2f}, min {100 * t1['min']:.2f}, max {100 * t1['max']:.2f}")
        else:
            lines.append(f"{label:<28} {100 * r['top1']:>7.2f}% {100 * r['top5']:>7.2f}% {r['images']:>8}")
    cal = report["calibration"]
    lines.append(f"calibration: {cal['images']} images of '{cal['path']}' split {cal['split']} "
                 f"(evaluation: split {report['data']['split']})")
    return "\n".join(lines)


def write_report(report: dict, path) -> None:
    from .io import write_bytes_atomic
    write_bytes_atomic(json.dumps(report, indent=1, sort_keys=True).encode(), path)
