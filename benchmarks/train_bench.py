"""Training speed of PIM-QAT against float training, per scheme, on the shared ResNet-20.

    python benchmarks/train_bench.py [--steps 6] [--batch 128] [--threads 2] [--schemes native,differential,bit-serial]

At the evidence point of examples/resnet20_pimqat.py (W4A4, 144-row channel arrays, 4-bit ADC,
calibrated range), prints for every scheme the images/s of one training step (forward,
backward, SGD step; eager PyTorch) of the float model and of the PIM-QAT model, measured
interleaved step by step in this one run (so that a shared machine's drift falls on both),
their time ratio, the compiled graph's MAC expansion (``pimc.core.mapping.mac_expansion``)
and the ratio of the two.  Target (issue 13): time ratio <= 2 x the MAC expansion.

The ADC steps are fixed, as ``pimc train`` keeps them by default (``--adc-lr 0``: no LSQ step
gradient is computed); ``--adc-lr 3`` (any value > 0) times the step with their gradients.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from resnet20_cifar import load_resnet20, preprocess  # noqa: E402

import pimc.train as T  # noqa: E402
from pimc.core.mapping import mac_expansion, read_mapping  # noqa: E402
from pimc.train.loop import fix_adc_steps  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", default="native,differential,bit-serial")
    ap.add_argument("--adc-lr", type=float, default=0.0,
                    help="as pimc train's: 0 (default) keeps the ADC steps fixed, > 0 learns them")
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = a.shared / "data" / "models" / "resnet20_cifar10.th"
    tr = np.load(a.shared / "data" / "cifar10" / "train.npz")
    calib = preprocess(tr["x"][:512])
    xb = torch.from_numpy(preprocess(tr["x"][:a.batch]))
    yb = torch.from_numpy(tr["y"][:a.batch].astype(np.int64))
    print(f"training step, batch {a.batch}, {a.threads} threads, eager; median of {a.steps} interleaved steps; "
          f"ADC steps {'fixed' if a.adc_lr == 0 else 'learned'} (--adc-lr {a.adc_lr:g})")
    print(f"{'scheme':<14}{'float img/s':>12}{'PIM-QAT img/s':>15}{'time ratio':>12}{'MAC expansion':>15}"
          f"{'ratio/expansion':>17}")
    for scheme in a.schemes.split(","):
        net = load_resnet20(str(ckpt))
        res = T.compile_module(net, [3, 32, 32], calib_inputs={"input": calib}, scheme=scheme, weight_bits=4,
                               input_bits=4, adc_bits=4, array_rows=144, adc_range="calibrated")
        qm = T.prepare(net, res, rescale=True).train()
        fix_adc_steps(qm, a.adc_lr == 0)   # as pimc.train.loop.fit does
        flt = load_resnet20(str(ckpt)).train()
        models = {"float": flt, "pim": qm}
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()}
        times = {k: [] for k in models}
        for i in range(a.steps + 1):
            for k, m in models.items():
                t0 = time.perf_counter()
                loss = TF.cross_entropy(m(xb), yb)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                if i:
                    times[k].append(time.perf_counter() - t0)
        tf, tp = float(np.median(times["float"])), float(np.median(times["pim"]))
        exp = mac_expansion(read_mapping(res.model))
        print(f"{scheme:<14}{a.batch / tf:>12.0f}{a.batch / tp:>15.1f}{tp / tf:>12.2f}{exp:>15.2f}"
              f"{tp / tf / exp:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
