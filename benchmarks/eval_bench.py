"""Overhead of `pimc eval` over the bare runtime on the same compiled model.

    python benchmarks/eval_bench.py [--images 2000] [--batch 256] [--shared ../shared] [--repeats 2]

Compiles the pretrained ResNet-20 from ../shared (differential, W8A8, 144-row
arrays, 7-bit ADC; needs the torch extra for the export) and measures, in this
one run, on the same preprocessed CIFAR-10 test images:

* bare runtime: ``pimc.runtime.open_session`` + ``sess.run`` over batches;
* the evaluation layer: the executor job `pimc eval` runs for that model
  (session, batches, top-1/top-5 counting, progress), timed inside
  ``pimc.evaluate.evaluate`` on the same compiled model;

* the baseline a user has: the original (float) ONNX model in a default
  ``onnxruntime.InferenceSession`` (every graph optimization on, the same threads);

alternating the three ``--repeats`` times and keeping the best of each (these
machines are shared and noisy), and prints images/s of each, the overhead of the
evaluation layer (target: under 10 %) and the compiled model's time over the
original model's.  It also prints the time of the whole `evaluate` call by
part (compiles, float/digital/ideal runs, per-layer statistics).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

CONFIG = dict(scheme="differential", weight_bits=8, input_bits=8, array_rows=144, adc_bits=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    from pimc.core.config import CompileConfig
    from pimc.datasets import CIFAR_NORMALISATION
    from pimc.evaluate import evaluate, load_eval_data
    from pimc.executor import LocalExecutor
    from pimc.pipeline import compile_model
    from pimc.runtime import open_session
    from resnet20_cifar import export_onnx, load_resnet20

    ckpt = a.shared / "data/models/resnet20_cifar10.th"
    if not ckpt.is_file():
        sys.exit(f"needs {ckpt} (the shared data); pass --shared")
    prep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in CIFAR_NORMALISATION.items()}
    data, calib = a.shared / "data/cifar10/test.npz", a.shared / "data/cifar10/train.npz"
    loaded = load_eval_data(str(data), "test", str(calib), "train", prep, a.images, 256, 0)
    x = loaded[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "resnet20.onnx")
        export_onnx(load_resnet20(str(ckpt)), model)
        cfg = CompileConfig(**CONFIG)
        cpath = Path(tmp) / "calib.npy"
        np.save(cpath, loaded[2])
        pim = compile_model(model, cfg.replace(calib_data=str(cpath))).model

        def bare() -> float:
            t0 = time.perf_counter()
            sess = open_session(pim)
            for i in range(0, len(x), a.batch):
                sess.run(None, {"input": x[i:i + a.batch]})
            return len(x) / (time.perf_counter() - t0)

        def original() -> float:
            import onnxruntime as ort
            t0 = time.perf_counter()
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            for i in range(0, len(x), a.batch):
                sess.run(None, {"input": x[i:i + a.batch]})
            return len(x) / (time.perf_counter() - t0)

        def through_eval() -> tuple[float, dict]:
            cache: dict = {}
            rep = evaluate(model, str(data), cfg, prep=prep, limit=a.images, batch=a.batch, stats_images=0,
                           loaded=loaded, cache=cache, executor=LocalExecutor())
            return len(x) / rep["timing_s"]["ideal_pim"], rep

        bare_r, eval_r, float_r, rep = [], [], [], None
        for _ in range(a.repeats):
            float_r.append(original())
            bare_r.append(bare())
            r, rep = through_eval()
            eval_r.append(r)
        t0 = time.perf_counter()
        full = evaluate(model, str(data), cfg, prep=prep, limit=a.images, batch=a.batch, stats_images=64,
                        loaded=loaded, executor=LocalExecutor())
        full_s = time.perf_counter() - t0
    b, e, f = max(bare_r), max(eval_r), max(float_r)
    print(f"ResNet-20, {len(x)} CIFAR-10 test images, batch {a.batch}; compiled: {CONFIG}")
    print(f"original model, default onnxruntime   {f:8.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in float_r)})")
    print(f"bare runtime (open_session + run)     {b:8.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in bare_r)})")
    print(f"pimc eval, same model (executor job)  {e:8.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in eval_r)})")
    print(f"compiled/original time                {f / b:8.2f} x")
    over = 100 * (b / e - 1)
    print(f"evaluation-layer overhead             {over:8.1f} %   (target < 10 %: {'OK' if over < 10 else 'MISSED'})")
    print(f"whole evaluate() call with 64-image layer statistics: {full_s:.1f} s, by part:")
    for k, v in full["timing_s"].items():
        print(f"  {k:<28} {v:7.1f} s")
    print(f"top-1: float {100 * rep['results']['float']['top1']:.2f} %, digital {100 * rep['results']['digital']['top1']:.2f} %,"
          f" ideal PIM {100 * rep['results']['ideal_pim']['top1']:.2f} %")


if __name__ == "__main__":
    main()
