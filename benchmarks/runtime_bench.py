"""Runtime speed and memory of the compiled ResNet-20 in onnxruntime.

    python benchmarks/runtime_bench.py [--images 2000] [--batch 256] [--shared ../shared]

Exports the pretrained ResNet-20 from ../shared (needs the torch extra), compiles it
for each scheme of SPEED (128-row arrays, 6-bit ideal ADC, activation and ADC ranges
calibrated on 512 training images) and prints, measured in this one run, interleaved
batch by batch so that the drift of a shared machine falls on every session alike:

* images/s of the original model in a default onnxruntime session (what a user runs:
  ``onnxruntime.InferenceSession`` with default options, every graph optimization on,
  the same thread count) and of each compiled model (``pimc.runtime.open_session``:
  native kernels, array convs fused with their ADCs), their time ratio and the MAC
  expansion factor of each compiled graph (its MACs over the float model's).
  Targets (issue 14): compiled/float time <= 1.0 x the expansion; 0.5 x for bit planes
  times 1-bit cells; W1 (differential, W8A8) >= 1,200 images/s;
* for W1 and bit-serial+differential 1-bit cells: the fused kernels against the same
  native ops unfused (``fuse=False``) and the function bodies (--body-images images);
  the non-ideal ADC (PIM-QAT 7-bit chip spreads, thermal noise 0.5 LSB; then also a
  0.8 LSB INL transfer curve) against the ideal ADC (target <= 1.3 x its time); device
  variation (5 % lognormal per cell: non-integer cell weights, so the array conv runs
  as onnxruntime's float Conv, unfused) against the unfused ideal model, which runs the
  same float Conv (target <= 1.1 x: the per-cell factors only change the weights);
* peak resident memory at batch 256 of each MEMORY_SCHEMES entry (each in a fresh
  process, compile with calibration included; target < 2 GiB).
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


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across fork+exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

BENCH = dict(scheme="bit-serial+differential", input_bits=4, weight_bits=4, cell_bits=1, array_rows=128, adc_bits=6)
W1 = dict(scheme="differential", input_bits=8, weight_bits=8, array_rows=128, adc_bits=6)
SPEED = {
    "W1: differential W8A8": W1,
    "native W4A4": dict(scheme="native", input_bits=4, weight_bits=4, array_rows=128, adc_bits=6),
    "differential W4A4": dict(scheme="differential", input_bits=4, weight_bits=4, array_rows=128, adc_bits=6),
    "bit-serial W4A4": dict(scheme="bit-serial", input_bits=4, weight_bits=4, array_rows=128, adc_bits=6),
    "bit-serial+differential W4A4, 1-bit cells": BENCH,
}
MEMORY_SCHEMES = {
    "native N=9 (pimqat-native)": dict(preset="pimqat-native"),
    "differential N=144 (pimqat-differential)": dict(preset="pimqat-differential"),
    "bit-serial N=144 (pimqat-bit-serial)": dict(preset="pimqat-bit-serial"),
    "bench: bit-serial+differential W4A4 1-bit cells": BENCH,
    "W1: differential W8A8": W1,
    "bit-serial W8A8 1-bit cells, 8-bit ADC (lossless)": dict(scheme="bit-serial", input_bits=8, weight_bits=8,
                                                                cell_bits=1, adc_bits=8),
}


def rates(sessions: dict, x, batch, n) -> dict:
    """images/s of each session on the first n images, measured interleaved batch by batch
    (every session runs batch i before any runs batch i+1), so that the drift of a shared
    machine falls on all of them alike."""
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    spent = dict.fromkeys(sessions, 0.0)
    for k, s in sessions.items():
        s.run(None, {name[k]: x[:batch]})      # warm-up
    for i in range(0, n, batch):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {name[k]: x[i:min(i + batch, n)]})
            spent[k] += time.perf_counter() - t0
    return {k: n / t for k, t in spent.items()}


def memory_child(opts: str, model: str, calib: str, xfile: str) -> None:
    import pimc
    from pimc.runtime import open_session
    x = np.load(xfile)
    res = pimc.compile_model(model, calib_data=calib, **json.loads(opts))
    sess = open_session(res.model)
    sess.run(None, {"input": x[:256]})
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--body-images", type=int, default=512)
    ap.add_argument("--nonideal-images", type=int, default=2048)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return memory_child(*a.child)

    import pimc
    from pimc.core.mapping import mac_expansion, read_mapping
    from pimc.runtime import open_session
    from pimc.core.chip import build_chip_config
    from pimc.runtime.native import native_library
    from resnet20_cifar import export_onnx, load_resnet20, preprocess

    ckpt = a.shared / "data/models/resnet20_cifar10.th"
    if not ckpt.is_file():
        sys.exit(f"needs {ckpt} (the shared data); pass --shared")
    if native_library() is None:
        sys.exit("native kernels unavailable: run 'pimc native --fetch-headers' first")
    test = np.load(a.shared / "data/cifar10/test.npz")
    x = preprocess(test["x"][: a.images])
    y = test["y"][: a.images]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, calib, xfile = tmp / "resnet20.onnx", tmp / "calib.npy", tmp / "x.npy"
        export_onnx(load_resnet20(str(ckpt)), str(model))
        np.save(calib, preprocess(np.load(a.shared / "data/cifar10/train.npz")["x"][:512]))
        np.save(xfile, x[:256])
        import onnxruntime as ort
        sessions = {"float": ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])}
        compiled, expansion = {}, {}
        for label, opts in SPEED.items():
            res = pimc.compile_model(str(model), calib_data=str(calib), **opts)
            compiled[label] = res.model
            expansion[label] = mac_expansion(read_mapping(res.model))
            sessions[label] = open_session(res.model, native=True)
        n, b = len(x), a.batch
        r = rates(sessions, x, b, n)
        acc = {k: float((s.run(None, {"input": x[:1000]})[0].argmax(1) == y[:1000]).mean()) for k, s in sessions.items()}
        detail = {}
        for label in ("W1: differential W8A8", "bit-serial+differential W4A4, 1-bit cells"):
            m = compiled[label]
            chip = build_chip_config(preset="pimqat-chip7", noise_sigma=0.5, chip_seed=1)
            inl = build_chip_config(preset="pimqat-chip7", noise_sigma=0.5, inl=0.8, chip_seed=1)
            dev = build_chip_config(device_sigma_cell=0.05, chip_seed=1)
            nb, nn = min(a.body_images, n), min(a.nonideal_images, n)
            detail[label] = {
                "kernels": (nb, rates({"fused": sessions[label], "unfused": open_session(m, native=True, fuse=False),
                                       "body": open_session(m, native=False)}, x, b, nb)),
                "adc": (nn, rates({"ideal": sessions[label], "noisy": open_session(m, chip),
                                   "inl": open_session(m, inl), "unfused ideal": open_session(m, fuse=False),
                                   "device variation": open_session(m, dev)}, x, b, nn))}
        peak_here = peak_rss_mib()
        mem = {}
        for label, opts in MEMORY_SCHEMES.items():
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(opts), str(model), str(calib), str(xfile)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{label}: failed:\n{out.stderr}")
            mem[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    import os
    print(f"ResNet-20, {n} CIFAR-10 test images, batch {b}, {os.cpu_count()} cores, interleaved; "
          f"ADC ranges calibrated (defaults)")
    print(f"{'float model (original, default onnxruntime session)':<46} {r['float']:8.1f} images/s   "
          f"top-1 (1000) {100 * acc['float']:.1f} %")
    for label, opts in SPEED.items():
        ratio = r["float"] / r[label]
        target = 0.5 if opts.get("cell_bits") == 1 and opts["scheme"].startswith("bit-serial") else 1.0
        print(f"{label:<46} {r[label]:8.1f} images/s   top-1 (1000) {100 * acc[label]:.1f} %   time x{ratio:.2f}, "
              f"MAC expansion {expansion[label]:.1f} -> {ratio / expansion[label]:.2f} x the expansion "
              f"(target <= {target}: {'OK' if ratio / expansion[label] <= target else 'MISSED'})")
    w1 = r["W1: differential W8A8"]
    print(f"W1 {w1:.0f} images/s (target >= 1,200: {'OK' if w1 >= 1200 else 'MISSED'})")
    for label, d in detail.items():
        nb, k = d["kernels"]
        nn, q = d["adc"]
        print(f"{label} ({nb} images): fused {k['fused']:.1f}, unfused {k['unfused']:.1f}, function bodies "
              f"{k['body']:.1f} images/s")
        print(f"  non-ideal ADC ({nn} images): noise {q['noisy']:.1f} images/s -> time x{q['ideal'] / q['noisy']:.2f}, "
              f"noise + INL {q['inl']:.1f} -> x{q['ideal'] / q['inl']:.2f} (target <= 1.3: "
              f"{'OK' if max(q['ideal'] / q['noisy'], q['ideal'] / q['inl']) <= 1.3 else 'MISSED'})")
        dv = q["unfused ideal"] / q["device variation"]
        print(f"  device variation {q['device variation']:.1f} images/s: x{q['ideal'] / q['device variation']:.2f} the "
              f"fused ideal, x{dv:.2f} the unfused ideal (same float Conv; target <= 1.1: {'OK' if dv <= 1.1 else 'MISSED'})")
    print(f"peak RSS of this process (function-body runs included): {peak_here:.0f} MiB")
    print("peak RSS at batch 256, one fresh process per scheme, compile included (target < 2048 MiB):")
    for label, v in mem.items():
        print(f"  {label:<52} {v:7.0f} MiB {'OK' if v < 2048 else 'MISSED'}")


if __name__ == "__main__":
    main()
