"""Does what runs between batches change the float model's or pimc's speed?  (peer_bench.py's W1 figures
against runtime_bench.py's.)

    python benchmarks/interleave_check.py [--shared ../shared] [--images 2000] [--batch 250] [--threads 2]

For each mode, the float model (default onnxruntime session) and pimc W1 (peer_bench.py's
compile) run batch by batch, timed; after each pair of batches: nothing (``none``), one
aihwkit-lightning batch (``aihwkit``, skipped when it is not installed) or 3 s of torch
matrix products (``matmul``).  Prints images/s of both and pimc's time over the float model's.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    import peer_bench as PB
    from resnet20_cifar import load_resnet20, preprocess

    ckpt = a.shared / "data/models/resnet20_cifar10.th"
    if not ckpt.is_file():
        sys.exit(f"needs {ckpt} (the shared data); pass --shared")
    torch.set_num_threads(a.threads)
    te, tr = np.load(a.shared / "data/cifar10/test.npz"), np.load(a.shared / "data/cifar10/train.npz")
    x = preprocess(te["x"][:a.images])
    xtrain, ytrain = preprocess(tr["x"][:512]), tr["y"][:512].astype(np.int64)
    net = load_resnet20(str(ckpt)).eval()
    fs, pim, _ = PB.w1_sessions(net, xtrain, a.threads)
    between = {"none": None}
    if importlib.util.find_spec("aihwkit_lightning") is not None:
        model, _ = PB.aihwkit_model(net, xtrain, ytrain, [3.0], [6.0], a.threads)

        def aihwkit(xb):
            with torch.no_grad():
                model(torch.from_numpy(xb))
        between["aihwkit"] = aihwkit
    else:
        print("aihwkit: skipped (not installed: pip install aihwkit-lightning==2.1.0)")
    m = torch.randn(512, 512)

    def matmul(xb):
        t = time.perf_counter()
        while time.perf_counter() - t < 3:
            m @ m
    between["matmul"] = matmul
    fs.run(None, {"input": x[:a.batch]})
    pim.run(None, {"input": x[:a.batch]})
    print(f"{a.images} images, batch {a.batch}, {a.threads} threads")
    for mode, other in between.items():
        tf = tp = 0.0
        for i in range(0, len(x), a.batch):
            xb = x[i:i + a.batch]
            t = time.perf_counter()
            fs.run(None, {"input": xb})
            tf += time.perf_counter() - t
            t = time.perf_counter()
            pim.run(None, {"input": xb})
            tp += time.perf_counter() - t
            if other is not None:
                other(xb)
        print(f"between batches: {mode:<8} float {len(x) / tf:7.0f} images/s   pimc W1 {len(x) / tp:7.0f} images/s   "
              f"pimc / float time {tp / tf:.2f}x", flush=True)


if __name__ == "__main__":
    main()
