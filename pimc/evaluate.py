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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .core.config import CompileConfig
from .datasets import has_splits, load_images, preprocess
from .core.errors import PimcError


def _versions() -> dict:
    import onnx
    import onnxruntime
    return {"pimc": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain line at every quarter (for logs)."""

    def __init__(self, total: int, desc: str, log):
        self.total, self.desc, self.log, self.done, self.next = total, desc, log, 0, 0.25
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log and self.done / self.total >= self.next and self.done < self.total:
            self.log(f"{self.desc}: {self.done}/{self.total} images")
            while self.next <= self.done / self.total:
                self.next += 0.25

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _summary(counts: list[dict]) -> dict:
    """Mean/std/min/max of top-1 and top-5 over chips."""
    out = {}
    for k in ("top1", "top5"):
        v = np.array([c[k] for c in counts])
        out[k] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    return out


def _accuracy(r: dict) -> dict:
    return {"top1": r["correct_top1"] / r["images"], "top5": r["correct_top5"] / r["images"],
            "correct_top1": r["correct_top1"], "correct_top5": r["correct_top5"], "images": r["images"]}


def load_eval_data(data: str, split: str, calib_data: str | None, calib_split: str, prep: dict,
                   limit: int | None, calib_samples: int, seed: int):
    """Evaluation images (x, y), calibration images xc, and their report records.
    Calibration images come from another split or file, never from the evaluation images."""
    x_u8, y = load_images(data, split)
    if limit:
        x_u8, y = x_u8[:limit], y[:limit]
    calib_path = calib_data or data
    if Path(calib_path).resolve() == Path(data).resolve() and (calib_split == split or not has_splits(data)):
        if has_splits(data):
            other = "train" if split == "test" else "test"
            raise PimcError(f"calibration would read the evaluation images ('{data}', split {split}); "
                            f"use --calib-split {other}, or give --calib-from TRAIN.npz with training images")
        raise PimcError(f"calibration would read the evaluation images: '{data}' has no separate train/test "
                        f"splits; give the training images with --calib-from TRAIN.npz (an .npz, CIFAR "
                        f"directory or image folder)")
    try:
        xc_u8, _ = load_images(calib_path, calib_split)
    except PimcError as e:
        raise PimcError(f"calibration data: {e}; give --calib-from with training images")
    pick = np.sort(np.random.default_rng(seed).permutation(len(xc_u8))[:calib_samples])
    x, xc = preprocess(x_u8, **prep), preprocess(xc_u8[pick], **prep)
    data_rec = {"path": str(data), "split": split, "images": int(len(x)),
                "sha256_x": hashlib.sha256(np.ascontiguousarray(x_u8).tobytes()).hexdigest(), "preprocess": prep}
    calib_rec = {"path": str(calib_path), "split": calib_split, "images": int(len(xc)), "indices_seed": seed,
                 "indices_sha256": hashlib.sha256(pick.astype(np.int64).tobytes()).hexdigest()}
    return x, y, xc, data_rec, calib_rec


def digital_variant(cfg: CompileConfig) -> CompileConfig:
    """The digital quantized model a compile is compared with: every layer digital with the same
    bits and activation calibration, per-layer bits and float layers kept (its layers' input
    scales then equal the compile's, so a lossless ADC reproduces it exactly)."""
    keep = ("weight_bits", "input_bits", "act_calib")
    rules = []
    for r in cfg.layer_overrides:
        r2 = {k: v for k, v in r.items() if k in keep}
        if r.get("scheme") == "float":
            r2["scheme"] = "float"
        if r2:
            rules.append({"match": list(r["match"]), **r2, **({"where": r["where"]} if "where" in r else {})})
    return CompileConfig(scheme="digital", weight_bits=cfg.weight_bits, input_bits=cfg.input_bits, fold_bn=cfg.fold_bn,
                         seed=cfg.seed, calib_samples=cfg.calib_samples, act_calib=cfg.act_calib,
                         layer_overrides=tuple(rules))


def evaluate(model: str, data: str, config: CompileConfig, *, chip=None, chips: int = 0, split: str = "test",
             calib_data: str | None = None, calib_split: str = "train", prep: dict | None = None,
             limit: int | None = None, batch: int = 256, calibrate_bn: bool = False, stats_images: int = 64,
             executor=None, log=None, cache: dict | None = None, loaded=None) -> dict:
    """Evaluate ``model`` on the same images as: float, digital quantized, ideal PIM,
    ``chips`` non-ideal chip instances (seeds chip.chip_seed, +1, ...) and, with
    ``calibrate_bn``, the same chips after BN calibration.  ``cache`` (a dict)
    shares compiled baselines and their results between calls (``pimc sweep``);
    ``loaded`` is ``load_eval_data``'s result when the caller has it already."""
    from .executor import LocalExecutor
    from .pipeline import compile_model
    from pimc.core.chip import ChipConfig, build_chip_config
    prep = prep or {}
    # calibration images are real here, and they come from the calibration split (never a file of the config)
    config = config.resolved(real_calibration=True).replace(calib_data=None)
    if calibrate_bn and (not config.pim or chips < 1):
        raise PimcError("--calibrate-bn needs a PIM scheme and --chips >= 1")
    if calibrate_bn and config.fold_bn != "output":
        raise PimcError("--calibrate-bn recalibrates the BatchNorm kept after the arrays: use --fold-bn output")
    executor = executor or LocalExecutor(progress_factory=lambda n, d: _Progress(n, d, log))
    cache = {} if cache is None else cache
    x, y, xc, data_rec, calib_rec = loaded or load_eval_data(data, split, calib_data, calib_split, prep, limit,
                                                             config.calib_samples, config.seed)
    report = {"versions": _versions(), "compile_config": config.to_dict(), "data": data_rec,
              "calibration": calib_rec, "executor": executor.name, "results": {}, "timing_s": {}}
    base = chip if isinstance(chip, ChipConfig) else build_chip_config(adc="nonideal")
    chip_list = [ChipConfig(**{**asdict(base), "chip_seed": base.chip_seed + k}) for k in range(chips)]
    cfg = config
    # the baselines depend on these fields only (so sweeps share them)
    variants = {"float": CompileConfig(scheme="float", fold_bn=config.fold_bn, seed=config.seed),
                "digital": digital_variant(cfg)}
    if cfg.pim:
        variants["ideal_pim"] = cfg
    models, blobs, jobs, cached = {}, {}, [], {}
    for label, c in variants.items():
        key = (label, json.dumps({**c.to_dict(), "calib_data": None}, sort_keys=True), data_rec["sha256_x"],
               calib_rec["indices_sha256"], model)
        t0 = time.perf_counter()
        if key in cache:
            models[label], cached[label] = cache[key]
            continue
        res = compile_model(model, c, calib_inputs=None if label == "float" else xc)
        report["timing_s"][f"compile {label}"] = time.perf_counter() - t0
        models[label] = res.model
        blobs[label] = res.model.SerializeToString()
        jobs.append((label, blobs[label], None, key))
    pim_bytes = (blobs.get("ideal_pim") or models["ideal_pim"].SerializeToString()) if cfg.pim else None
    jobs += [(f"chip {c.chip_seed}", pim_bytes, c, None) for c in chip_list]
    calibrated = []
    if calibrate_bn:
        t0 = time.perf_counter()
        calibrated = executor.calibrate(pim_bytes, chip_list, xc, 64)
        report["timing_s"]["bn calibration"] = time.perf_counter() - t0
        jobs += [(f"chip {c.chip_seed} bn-calibrated", m, c, None) for c, (m, _) in zip(chip_list, calibrated)]
    results = executor.run([j[:3] for j in jobs], x, y, batch)
    for (label, _, _, key), r in zip(jobs, results):
        report["timing_s"][label] = r["seconds"]
        if log:
            log(f"{label}: {r['images']} images in {r['seconds']:.1f} s")
        if key is not None:
            cache[key] = (models[label], r)
    by_label = {j[0]: r for j, r in zip(jobs, results)}
    for label in variants:
        report["results"][label] = _accuracy(cached.get(label) or by_label[label])
    for tag, suffix in (("nonideal_pim", ""), ("nonideal_pim_bn_calibrated", " bn-calibrated")):
        if tag == "nonideal_pim_bn_calibrated" and not calibrate_bn or not chip_list:
            continue
        per_chip = [dict(_accuracy(by_label[f"chip {c.chip_seed}{suffix}"]), chip_seed=c.chip_seed)
                    for c in chip_list]
        report["results"][tag] = {"chips": per_chip, **_summary(per_chip)}
    if chip_list:
        report["chip_config"] = asdict(base)
    if calibrate_bn:
        report["bn_calibration"] = {"images": int(len(xc)), "split": calib_rec["split"],
                                    "chips": [dict(rec, chip_seed=c.chip_seed) for c, (_, rec) in
                                              zip(chip_list, calibrated)]}
    if cfg.pim and stats_images > 0:
        t0 = time.perf_counter()
        report["layers"] = _layer_report(models, chip_list, calibrated, x[:stats_images], log)
        report["stats_images"] = int(min(stats_images, len(x)))
        report["timing_s"]["layer statistics"] = time.perf_counter() - t0
    return report


def _layer_report(models, chip_list, calibrated, xs, log=None) -> list[dict]:
    """Per-layer SQNR / clipping / code histograms of ideal PIM, the first chip and
    (if any) the first chip after BN calibration, merged per layer."""
    import onnx
    from .layerstats import layer_stats
    from .core.mapping import read_mapping
    from pimc.runtime.chip import instantiate
    pim = models["ideal_pim"]
    mapping = read_mapping(pim)
    variants = {"ideal_pim": pim}
    if chip_list:
        variants[f"nonideal_pim (chip {chip_list[0].chip_seed})"] = instantiate(pim, chip_list[0])
    if calibrated:
        variants[f"bn_calibrated (chip {chip_list[0].chip_seed})"] = instantiate(
            onnx.load_from_string(calibrated[0][0]), chip_list[0])
    rows: dict[str, dict] = {}
    bar = _Progress(len(variants) * len(xs), f"layer statistics ({len(variants)} models)", log)
    for label, m in variants.items():
        for r in layer_stats(models["digital"], m, mapping, xs, progress=bar.update):
            row = rows.setdefault(r["layer"], {"layer": r["layer"]})
            for k in ("adc_bits", "conversions_per_inference"):
                if k in r:
                    row[k] = r[k]
            row[label] = {k: r[k] for k in ("sqnr_db", "exact", "clip_rate", "code_hist") if k in r}
    bar.close()
    return list(rows.values())


def top1_of(result: dict | None) -> float | None:
    """Top-1 of one report result row: the value, or the mean over chips; None when absent."""
    if result is None:
        return None
    t = result["top1"]
    return t["mean"] if isinstance(t, dict) else t


LABELS = {"float": "float", "digital": "digital quantized", "ideal_pim": "ideal PIM",
          "nonideal_pim": "non-ideal PIM", "nonideal_pim_bn_calibrated": "non-ideal PIM, BN calibrated"}


def report_table(report: dict) -> str:
    """The terminal table: accuracies, then per-layer figures when present."""
    lines = [f"{'model':<38} {'top-1':>8} {'top-5':>8} {'images':>8}"]
    for label, r in report["results"].items():
        name = LABELS.get(label, label)
        if "chips" in r:
            t1, t5 = r["top1"], r["top5"]
            lines.append(f"{name + ' (' + str(len(r['chips'])) + ' chips)':<38} {100 * t1['mean']:>7.2f}% "
                         f"{100 * t5['mean']:>7.2f}% {r['chips'][0]['images']:>8}   "
                         f"top-1 std {100 * t1['std']:.2f}, min {100 * t1['min']:.2f}, max {100 * t1['max']:.2f}")
        else:
            lines.append(f"{name:<38} {100 * r['top1']:>7.2f}% {100 * r['top5']:>7.2f}% {r['images']:>8}")
    cal = report["calibration"]
    lines.append(f"calibration: {cal['images']} images of '{cal['path']}' split {cal['split']} "
                 f"(evaluation: split {report['data']['split']})")
    if report.get("layers"):
        variants = [k for k in report["layers"][0] if isinstance(report["layers"][0][k], dict)]
        lines.append("")
        lines.append(f"per layer, on {report['stats_images']} images (SQNR vs digital dB / ADC clipping %):")
        head = f"{'layer':<40} {'conv/inf':>10}" + "".join(f" {v[:24]:>26}" for v in variants)
        lines.append(head)
        for row in report["layers"]:
            cells = []
            for v in variants:
                r = row[v]
                sq = "exact" if r.get("exact") else f"{r['sqnr_db']:.1f}" if r.get("sqnr_db") is not None else "-"
                cl = f"{100 * r['clip_rate']:.2f}" if "clip_rate" in r else "-"
                cells.append(f" {sq + ' / ' + cl:>26}")
            conv = row.get("conversions_per_inference")
            lines.append(f"{row['layer'][-40:]:<40} {conv if conv is not None else '-':>10}" + "".join(cells))
        total = sum(r.get("conversions_per_inference") or 0 for r in report["layers"])
        lines.append(f"ADC conversions per inference: {total}")
    return "\n".join(lines)


def write_report(report: dict, path, option: str = "--json") -> None:
    from .io import write_bytes_atomic
    write_bytes_atomic(json.dumps(report, indent=1, sort_keys=True).encode(), path, option)
