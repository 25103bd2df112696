"""Time and peak memory of a calibrated compile (activation and per-column ADC ranges), every scheme.

    python benchmarks/calib_bench.py [--shared ../shared] [--images 512] [--r18-inputs 64]
                                     [--act-calib M] [--adc-calib M] [--only r20|r18]

Two workloads, each compile in a fresh subprocess (its own peak resident memory, VmHWM):

* the shared ResNet-20 (real weights, calibration on ``--images`` CIFAR-10 training
  images; without ``../shared`` the same network with random weights and N(0, 1) inputs),
  W4A4, 128-row arrays, 6-bit ADC, calibrated ranges, for native, differential, bit-serial
  and bit-serial+differential with 1-bit cells;
* an ImageNet-shaped ResNet-18 (224x224, random weights, benchmarks/compile_bench.py),
  same settings, ``--r18-inputs`` N(0, 1) calibration inputs.

Prints seconds and peak RSS per compile and checks them against the targets: ResNet-20
under 30 s and 1 GiB per scheme at 512 images; ResNet-18 under 2 min and 4 GiB at 64 inputs.
Calibration methods: pimc's defaults unless --act-calib / --adc-calib are given.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMES = [("native", 0), ("differential", 0), ("bit-serial", 0), ("bit-serial+differential", 1)]
TARGETS = {"r20": (30.0, 1024.0), "r18": (120.0, 4096.0)}


def child(model: str, calib: str, opts: str) -> None:
    sys.path.insert(0, str(HERE))
    from compile_bench import peak_rss_mib
    import pimc
    x = np.load(calib)
    t0 = time.perf_counter()
    res = pimc.compile_model(model, calib_inputs=x, **json.loads(opts))
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_rss_mib": peak_rss_mib(), "passes": res.timings}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--r18-inputs", type=int, default=64)
    ap.add_argument("--act-calib")
    ap.add_argument("--adc-calib")
    ap.add_argument("--only", choices=["r20", "r18"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    sys.path.insert(0, str(HERE))
    import onnx
    from compile_bench import cifar_resnet, resnet18_imagenet
    base = dict(weight_bits=4, input_bits=4, array_rows=128, adc_bits=6, adc_range="calibrated")
    base.update({k: v for k, v in (("act_calib", a.act_calib), ("adc_calib", a.adc_calib)) if v})
    rng = np.random.default_rng(0)
    rows, missed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        work = []
        if a.only in (None, "r20"):
            ckpt = a.shared / "data/models/resnet20_cifar10.th"
            if ckpt.is_file():
                sys.path.insert(0, str(ROOT / "examples"))
                from resnet20_cifar import export_onnx, load_resnet20
                from pimc.datasets import CIFAR_NORMALISATION, load_images, preprocess
                export_onnx(load_resnet20(str(ckpt)), str(tmp / "r20.onnx"))
                xu8, _ = load_images(str(a.shared / "data/cifar10/train.npz"), "train")
                pick = np.sort(np.random.default_rng(0).permutation(len(xu8))[:a.images])
                prep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in CIFAR_NORMALISATION.items()}
                np.save(tmp / "r20.npy", preprocess(xu8[pick], **prep))
                what = f"shared ResNet-20, {a.images} CIFAR-10 training images"
            else:
                onnx.save(cifar_resnet(3)[0], tmp / "r20.onnx")
                np.save(tmp / "r20.npy", rng.standard_normal((a.images, 3, 32, 32)).astype(np.float32))
                what = f"ResNet-20 with random weights ({ckpt} not found), {a.images} N(0,1) inputs"
            work.append(("r20", what, calib_samples_opt(a.images)))
        if a.only in (None, "r18"):
            onnx.save(resnet18_imagenet()[0], tmp / "r18.onnx")
            np.save(tmp / "r18.npy", rng.standard_normal((a.r18_inputs, 3, 224, 224)).astype(np.float32))
            work.append(("r18", f"ResNet-18 224x224, random weights, {a.r18_inputs} N(0,1) inputs",
                         calib_samples_opt(a.r18_inputs)))
        for key, what, extra in work:
            print(f"{what}; W4A4, 128 rows, ADC 6 bits calibrated", flush=True)
            for scheme, cell in SCHEMES:
                opts = json.dumps({**base, **extra, "scheme": scheme, "cell_bits": cell})
                out = subprocess.run([sys.executable, __file__, "--child", str(tmp / f"{key}.onnx"),
                                      str(tmp / f"{key}.npy"), opts], capture_output=True, text=True)
                label = scheme + (f" (cells {cell} bit)" if cell else "")
                if out.returncode != 0:
                    err = (out.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"  {label:<36} FAILED (exit {out.returncode}): {err}", flush=True)
                    missed.append(f"{key} {label}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                t_max, m_max = TARGETS[key]
                ok = r["seconds"] < t_max and r["peak_rss_mib"] < m_max
                if not ok:
                    missed.append(f"{key} {label}")
                slow = sorted(r["passes"].items(), key=lambda kv: -kv[1])[:2]
                print(f"  {label:<36} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                      f"(target < {t_max:.0f} s, < {m_max:.0f} MiB: {'OK' if ok else 'MISSED'})  slowest: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in slow), flush=True)
                rows.append({"workload": key, "scheme": label, **r})
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")


def calib_samples_opt(n: int) -> dict:
    return {"calib_samples": n}


if __name__ == "__main__":
    main()
