"""Runtime speed and memory of the compiled ResNet-20 in onnxruntime.

    python benchmarks/runtime_bench.py [--images 10000] [--batch 256] [--shared ../shared]

Exports the pretrained ResNet-20 from ../shared (needs the torch extra),
compiles it bit-serial+differential with 4-bit inputs, 4-bit weights, 1-bit
cells, 128-row arrays and a 6-bit ideal ADC (activation scales calibrated on
512 training images), and prints, measured in this one run:

* images/s of the float model and of the compiled model (native kernels) on the
  test images, their time ratio, and the MAC expansion factor of the compiled
  graph (its MACs over the float model's).  The float baseline is what a user
  runs: the original exported model in a default onnxruntime session
  (``onnxruntime.InferenceSession`` with default options, every graph
  optimization on, the same thread count), not a pimc session;
* images/s with the native library and with the function bodies only
  (--body-images images: the function bodies are slow);
* images/s with the non-ideal ADC (PIM-QAT 7-bit chip spreads, thermal noise
  0.5 LSB; then also a 0.8 LSB INL transfer curve) against the ideal ADC
  (--nonideal-images images);
* peak resident memory at batch 256 of each scheme (each in a fresh process),
  the native N=9 scheme included.

Sessions compared with each other run interleaved, batch by batch, so that the
drift of a shared machine falls on both sides of a ratio alike.

Targets: compiled/float time <= 1.0 x the MAC expansion factor (issue 14; 0.5 x for bit planes
times 1-bit cells); non-ideal
<= 1.3 x ideal time; peak memory < 2 GiB at batch 256 for every scheme.
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
MEMORY_SCHEMES = {
    "native N=9 (pimqat-native)": dict(preset="pimqat-native"),
    "differential N=144 (pimqat-differential)": dict(preset="pimqat-differential"),
    "bit-serial N=144 (pimqat-bit-serial)": dict(preset="pimqat-bit-serial"),
    "bench: bit-serial+differential W4A4 1-bit cells": BENCH,
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
    ap.add_argument("--images", type=int, default=10000)
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
        res = pimc.compile_model(str(model), calib_data=str(calib), **BENCH)
        expansion = mac_expansion(read_mapping(res.model))
        import onnxruntime as ort
        s_float = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])   # a user's default session
        s_nat = open_session(res.model, native=True)
        s_body = open_session(res.model, native=False)
        chip = build_chip_config(preset="pimqat-chip7", noise_sigma=0.5, chip_seed=1)
        s_noisy = open_session(res.model, chip, native=True)
        s_inl = open_session(res.model, build_chip_config(preset="pimqat-chip7", noise_sigma=0.5, inl=0.8, chip_seed=1))
        n, b = len(x), a.batch
        r = rates({"float": s_float, "native": s_nat}, x, b, n)
        r_float, r_nat = r["float"], r["native"]
        nb = min(a.body_images, n)
        r = rates({"native": s_nat, "body": s_body}, x, b, nb)
        r_nat_small, r_body = r["native"], r["body"]
        nn = min(a.nonideal_images, n)
        r = rates({"ideal": s_nat, "noisy": s_noisy, "inl": s_inl}, x, b, nn)
        r_ideal_n, r_noisy, r_inl = r["ideal"], r["noisy"], r["inl"]
        acc = float((s_nat.run(None, {"input": x[:1000]})[0].argmax(1) == y[:1000]).mean())
        peak_here = peak_rss_mib()
        mem = {}
        for label, opts in MEMORY_SCHEMES.items():
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(opts), str(model), str(calib), str(xfile)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{label}: failed:\n{out.stderr}")
            mem[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    ratio = r_float / r_nat
    print(f"ResNet-20, {n} CIFAR-10 test images, batch {b}; compiled: {json.dumps(BENCH)}")
    print(f"float model              {r_float:9.1f} images/s   (the original model, default onnxruntime session)")
    print(f"compiled, native kernels {r_nat:9.1f} images/s   (top-1 on the first 1000 images: {100 * acc:.1f} %)")
    print(f"compiled/float time      {ratio:9.1f} x")
    target = 0.5 if BENCH.get("cell_bits") == 1 and BENCH["scheme"].startswith("bit-serial") else 1.0
    print(f"MAC expansion factor     {expansion:9.1f} x   -> time ratio / expansion = {ratio / expansion:.2f} "
          f"(target <= {target}: {'OK' if ratio / expansion <= target else 'MISSED'})")
    print(f"native vs function bodies ({nb} images): {r_nat_small:.1f} vs {r_body:.1f} images/s "
          f"({r_nat_small / r_body:.1f} x faster)")
    print(f"non-ideal ADC vs ideal ({nn} images): {r_noisy:.1f} vs {r_ideal_n:.1f} images/s -> time x{r_ideal_n / r_noisy:.2f} "
          f"(target <= 1.3: {'OK' if r_ideal_n / r_noisy <= 1.3 else 'MISSED'})")
    print(f"  with a transfer-curve nonlinearity too (INL 0.8 LSB): {r_inl:.1f} images/s -> time x{r_ideal_n / r_inl:.2f} "
          f"(target <= 1.3: {'OK' if r_ideal_n / r_inl <= 1.3 else 'MISSED'})")
    print(f"peak RSS of this process (function-body runs included): {peak_here:.0f} MiB")
    print("peak RSS at batch 256, one fresh process per scheme (target < 2048 MiB):")
    for label, v in mem.items():
        print(f"  {label:<52} {v:7.0f} MiB {'OK' if v < 2048 else 'MISSED'}")


if __name__ == "__main__":
    main()
