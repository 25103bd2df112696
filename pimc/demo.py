"""``pimc demo``: the main job on the embedded default, with no downloads.

Compiles the small digits CNN shipped in ``pimc/data`` (trained by
examples/train_digits_cnn.py on scikit-learn's bundled digits) three ways,
runs each in onnxruntime on the 500 held-out test images, and prints float vs
digital quantized vs ideal-PIM accuracy.  Calibration uses 256 training
images, never the test images.
"""
from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from .core.config import build_config
from .pipeline import compile_model
from .summary import mapping_summary
from pimc.runtime import open_session


def embedded_files() -> tuple[Path, Path]:
    base = resources.files("pimc") / "data"
    return Path(str(base / "digits_cnn.onnx")), Path(str(base / "digits.npz"))


def accuracy(model, x, y) -> float:
    sess = open_session(model)
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


def run_demo(*, scheme="differential", adc_bits=(3, 4, 5, 6), weight_bits=4, input_bits=4, array_rows=128,
             cell_bits=0, echo=print) -> dict:
    model_path, data_path = embedded_files()
    with np.load(data_path, allow_pickle=False) as d:
        x, y, calib = d["x_test"], d["y_test"].astype(np.int64), d["x_calib"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calib)
        common = dict(weight_bits=weight_bits, input_bits=input_bits, calib_data=str(calib_path))
        configs = [
            ("float", build_config(scheme="float")),
            (f"digital W{weight_bits}A{input_bits}", build_config(scheme="digital", **common)),
        ] + [
            (f"ideal PIM {scheme}, {b}-bit ADC", build_config(scheme=scheme, adc_bits=b, array_rows=array_rows,
                                                              cell_bits=cell_bits, **common))
            for b in adc_bits
        ]
        for label, cfg in configs:
            t0 = time.perf_counter()
            res = compile_model(str(model_path), cfg)
            t1 = time.perf_counter()
            acc = accuracy(res.model, x, y)
            results[label] = {"accuracy": acc, "compile_s": t1 - t0, "run_s": time.perf_counter() - t1}
            if cfg.pim:
                last = res
    echo(f"pimc demo: digits CNN (embedded), {len(x)} test images, calibration on {len(calib)} training images")
    echo(mapping_summary(last.mapping, last.pim.config.to_dict()))
    echo("")
    echo(f"{'model':<44} {'top-1':>7} {'compile':>9} {'run':>8}")
    for label, r in results.items():
        echo(f"{label:<44} {100 * r['accuracy']:>6.2f}% {r['compile_s']:>8.2f}s {r['run_s']:>7.2f}s")
    return results
