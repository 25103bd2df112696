"""What ``pimc train`` does (the CLI parses options; this runs them): load the user's module
and weights, compile its export with ``--fold-bn output``, prepare it, train, export the IR,
and report direct vs trained top-1 of the deployed IR in onnxruntime."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pimc import __version__
from pimc.core.errors import PimcError


def load_module(spec: str) -> torch.nn.Module:
    """``FILE.py:factory`` -> the module the factory returns (called without arguments)."""
    path, _, factory = spec.rpartition(":")
    if not path or not factory:
        raise PimcError(f"--module: '{spec}' is not FILE.py:factory (a Python file and a function in it that "
                        f"returns the nn.Module)")
    p = Path(path)
    if not p.is_file():
        raise PimcError(f"--module: file '{p}' not found")
    mod_spec = importlib.util.spec_from_file_location(f"pimc_user_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, str(p.resolve().parent))
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:   # the user's file: say which and why, in one line
        raise PimcError(f"--module: importing '{p}' failed: {type(e).__name__}: {e}")
    finally:
        sys.path.pop(0)
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise PimcError(f"--module: '{p}' has no function '{factory}'")
    m = fn()
    if not isinstance(m, torch.nn.Module):
        raise PimcError(f"--module: {factory}() returned a {type(m).__name__}, not a torch.nn.Module")
    return m


def load_checkpoint(module: torch.nn.Module, path: Path) -> None:
    """A state_dict (or {"state_dict": ...}; a "module." prefix is dropped), loaded with
    ``weights_only=True``."""
    if not Path(path).is_file():
        raise PimcError(f"--checkpoint: file '{path}' not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PimcError(f"--checkpoint: '{path}' is not a torch state_dict file ({type(e).__name__}: {e})")
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict):
        raise PimcError(f"--checkpoint: '{path}' holds no state_dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise PimcError(f"--checkpoint: '{path}' does not fit the module: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")


def _hashes(x: np.ndarray) -> set:
    return {hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in x}


def check_disjoint(train_u8: np.ndarray, test_u8: np.ndarray, data: str) -> None:
    """Training or calibration images must not include evaluation images."""
    n = len(_hashes(test_u8) & _hashes(train_u8))
    if n:
        raise PimcError(f"--data '{data}': {n} of the test images also appear in the training images; training and "
                        f"calibration must not see evaluation images")


def predictions(model, x, chip=None, batch: int = 500) -> np.ndarray:
    """Top-1 class of each image of ``x`` under onnxruntime (on ``chip`` where given)."""
    from pimc.runtime.session import open_session, run_batches
    sess = open_session(model, chip, chip_seed=None if chip is None else chip.chip_seed)
    out = np.concatenate([o[0] for _, _, o in run_batches(sess, None, {sess.get_inputs()[0].name: x}, batch)])
    return out.argmax(1)


def top1(model, x, y, chip=None, batch: int = 500) -> float:
    return float((predictions(model, x, chip, batch) == y).mean())


def chips_top1(model, x, y, chip, n: int, xcal: np.ndarray, bncal: bool = True) -> dict:
    """Top-1 over ``n`` chips of ``chip``'s kind (seeds chip_seed, chip_seed+1, ...), each BN-calibrated
    on ``xcal`` first (``bncal`` and the model has BN output affines): mean, std, min, max, per chip."""
    import dataclasses

    from pimc.bncal import bn_layers, calibrate_bn
    from pimc.core.mapping import read_mapping
    bncal = bncal and bool(bn_layers(read_mapping(model)))
    accs = []
    for k in range(n):
        c = dataclasses.replace(chip, chip_seed=chip.chip_seed + k)
        accs.append(top1(calibrate_bn(model, c, xcal)[0] if bncal else model, x, y, c))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "min": float(np.min(accs)),
            "max": float(np.max(accs)), "per_chip": accs}


def run_train(*, module: str, checkpoint: Path, data: Path, test_data: Path | None, output: Path, json_path: Path | None, config,
              prep: dict, tcfg, subset: int | None, calib_images: int, eval_images: int | None, rescale: bool,
              train_adc_bits: int | None, chip, chips: int, state_path: Path, resume: bool, log) -> dict:
    from pimc.datasets import has_splits, load_images, preprocess
    from . import compile_module, export, prepare
    from .loop import fit

    t0 = time.time()
    net = load_module(module)
    load_checkpoint(net, checkpoint)
    net.eval()
    splits = has_splits(data)
    if test_data is None and not splits:
        raise PimcError(f"--data '{data}' has no separate train/test splits; give the evaluation images with "
                        f"--test-data TEST.npz")
    xtr_u8, ytr = load_images(data, "train")
    xte_u8, yte = load_images(test_data or data, "test")
    if eval_images:
        xte_u8, yte = xte_u8[:eval_images], yte[:eval_images]
    check_disjoint(xtr_u8, xte_u8, str(data))   # calibration images come from the training images too
    rng = np.random.default_rng(tcfg.seed)
    pick = np.sort(rng.permutation(len(xtr_u8))[:subset]) if subset else np.arange(len(xtr_u8))
    xtr, ytr = preprocess(xtr_u8[pick], **prep), np.asarray(ytr)[pick].astype(np.int64)
    xte, yte = preprocess(xte_u8, **prep), np.asarray(yte).astype(np.int64)
    xcal = preprocess(xtr_u8[np.sort(np.random.default_rng([tcfg.seed, 2]).permutation(len(xtr_u8))[:calib_images])],
                      **prep)
    log(f"pimc train: {len(xtr)} training images, {len(xcal)} calibration images, {len(xte)} test images")
    res = compile_module(net, list(xtr.shape[1:]), config=config, calib_inputs={"input": xcal})
    direct = top1(res.model, xte, yte)
    log(f"pimc train: compiled ({config.scheme}); direct deployment top-1 {100 * direct:.2f} %")
    qm = prepare(net, res, rescale=rescale, train_adc_bits=train_adc_bits, source=str(module))
    run_cfg = {"module": module, "checkpoint": str(checkpoint), "data": str(data), "test_data": str(test_data) if test_data else None, "subset": subset,
               "calib_images": calib_images, "compile": json.loads(res.pim.config.to_json()), "rescale": rescale,
               "train_adc_bits": train_adc_bits}
    hist = fit(qm, xtr, ytr, tcfg, state_path=state_path, resume=resume, chip=chip if tcfg.resample_every else None,
               run_config=run_cfg, log=log)
    qm.set_chip(None)
    out = export(qm, output)
    trained = top1(out.model, xte, yte)
    log(f"wrote {output}")
    report = {"pimc": __version__, "torch": torch.__version__, "config": run_cfg, "train": tcfg.to_dict(),
              "steps": hist["steps"], "final_loss": float(np.mean([v for _, v in hist["loss"][-20:]])),
              "test_images": int(len(xte)), "top1": {"direct": direct, "trained": trained}}
    if chips and chip is not None:
        report["chips_bn_calibrated"] = {"chip": json.loads(chip.to_json()),
                                         **{name: chips_top1(model, xte, yte, chip, chips, xcal[:256])
                                            for name, model in (("direct", res.model), ("trained", out.model))}}
    report["seconds"] = round(time.time() - t0, 1)
    if json_path:
        from pimc.evaluate import write_report
        write_report(report, json_path)
        log(f"wrote {json_path}")
    return report

