"""Compile time and peak memory of `pimc compile` on ResNet-20, ResNet-56 and ResNet-18.

    python benchmarks/compile_bench.py [--scheme differential] [--adc-bits 6] [--calib-samples 8]

The models are built in this script with onnx.helper and random weights (the
compile cost does not depend on the weight values): the CIFAR ResNet-20 and
ResNet-56 (option-A shortcuts, 32x32 inputs) and an ImageNet-size ResNet-18
(224x224 inputs, 11.7 M weights).  Each compile runs in a fresh subprocess so
that its peak resident memory (ru_maxrss) is its own.  Calibration uses
--calib-samples synthetic inputs.  Prints, per model: weights, compile seconds,
seconds per million weights, peak RSS, and the ratios that show how compile
time grows with the number of weights.  Baseline (what a user has): opening the
original model in a default ``onnxruntime.InferenceSession`` (its own graph
optimizations) and running the same calibration inputs through it once, timed in
the same subprocess; the compile/baseline ratio is printed per model.  Target: ResNet-20 under 2 s; time per
weight roughly constant.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across fork+exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import onnx
from onnx import helper, numpy_helper as nh


class Builder:
    def __init__(self, seed=0):
        self.nodes, self.inits, self.n = [], [], 0
        self.rng = np.random.default_rng(seed)
        self.weights = 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, arr, p):
        n = self.name(p)
        self.inits.append(nh.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, n))
        return n

    def conv_bn(self, x, cin, cout, k, stride, relu=True):
        w = self.const(self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k)), "w")
        self.weights += cout * cin * k * k
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [y], name=y, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4))
        bn = [self.const(v, "bn") for v in (np.ones(cout), np.zeros(cout), np.zeros(cout), np.ones(cout))]
        z = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [y] + bn, [z], name=z))
        if relu:
            r = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [z], [r], name=r))
            return r
        return z

    def add_relu(self, a, b):
        s, r = self.name("add"), self.name("relu")
        self.nodes += [helper.make_node("Add", [a, b], [s], name=s), helper.make_node("Relu", [s], [r], name=r)]
        return r

    def head(self, x, c, classes):
        p, f, y = self.name("gap"), self.name("flat"), "logits"
        w = self.const(self.rng.standard_normal((c, classes)) * 0.05, "fc")
        b = self.const(np.zeros(classes), "fcb")
        self.weights += c * classes
        self.nodes += [helper.make_node("GlobalAveragePool", [x], [p], name=p),
                       helper.make_node("Flatten", [p], [f], name=f),
                       helper.make_node("Gemm", [f, w, b], [y], name="fc")]
        return y

    def model(self, hw, classes):
        g = helper.make_graph(self.nodes, "resnet", [helper.make_tensor_value_info("input", 1, ["N", 3, hw, hw])],
                              [helper.make_tensor_value_info("logits", 1, ["N", classes])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def cifar_resnet(blocks: int) -> tuple[onnx.ModelProto, int]:
    b = Builder()
    x = b.conv_bn("input", 3, 16, 3, 1)
    cin = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = b.conv_bn(b.conv_bn(x, cin, planes, 3, s), planes, planes, 3, 1, relu=False)
            if s != 1 or cin != planes:   # option A: subsample and zero-pad channels
                sl, pd = b.name("slice"), b.name("pad")
                b.nodes += [helper.make_node("Slice", [x, b.const(np.array([0, 0], np.int64), "st"),
                                                       b.const(np.array([2 ** 30] * 2, np.int64), "en"),
                                                       b.const(np.array([2, 3], np.int64), "ax"),
                                                       b.const(np.array([2, 2], np.int64), "sp")], [sl], name=sl),
                            helper.make_node("Pad", [sl, b.const(np.array([0, (planes - cin) // 2, 0, 0, 0, (planes - cin) // 2, 0, 0], np.int64), "pads")], [pd], name=pd)]
                x = pd
            x = b.add_relu(y, x)
            cin = planes
    b.head(x, 64, 10)
    return b.model(32, 10), b.weights


def resnet18_imagenet() -> tuple[onnx.ModelProto, int]:
    b = Builder()
    x = b.conv_bn("input", 3, 64, 7, 2)
    mp = b.name("maxpool")
    b.nodes.append(helper.make_node("MaxPool", [x], [mp], name=mp, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = mp, 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            s = stride if i == 0 else 1
            y = b.conv_bn(b.conv_bn(x, cin, planes, 3, s), planes, planes, 3, 1, relu=False)
            sc = b.conv_bn(x, cin, planes, 1, s, relu=False) if (s != 1 or cin != planes) else x
            x = b.add_relu(y, sc)
            cin = planes
    b.head(x, 512, 1000)
    return b.model(224, 1000), b.weights


def child(path: str, opts: str) -> None:
    import time
    import pimc
    kw = json.loads(opts)
    t0 = time.perf_counter()
    res = pimc.compile_model(path, **kw)
    dt = time.perf_counter() - t0
    size = len(res.model.SerializeToString())
    import onnxruntime as ort
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [kw.get("calib_samples", 8)] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    sess.run(None, {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    base = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "baseline_seconds": base, "peak_rss_mib": peak_rss_mib(),
                      "ir_mib": size / 2 ** 20, "passes": res.timings}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="differential")
    ap.add_argument("--adc-bits", type=int, default=6)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    opts = json.dumps({"scheme": a.scheme, "adc_bits": a.adc_bits, "calib_samples": a.calib_samples})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, weights) in (("ResNet-20", cifar_resnet(3)), ("ResNet-56", cifar_resnet(9)),
                                       ("ResNet-18 (224)", resnet18_imagenet())):
            path = Path(tmp) / f"{name.split()[0]}.onnx"
            onnx.save(model, path)
            out = subprocess.run([sys.executable, __file__, "--child", str(path), opts], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name}: compile failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(name=name, weights=weights)
            rows.append(r)
            print(f"{name:<16} {weights / 1e6:7.3f} M weights  compile {r['seconds']:6.2f} s  "
                  f"{r['seconds'] / (weights / 1e6):6.2f} s/M weights  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"IR {r['ir_mib']:6.1f} MiB  default onnxruntime session + calibration inputs "
                  f"{r['baseline_seconds']:5.2f} s (compile x{r['seconds'] / r['baseline_seconds']:.1f})", flush=True)
    base = rows[0]
    print(f"\nscheme {a.scheme}, ADC {a.adc_bits} bits, {a.calib_samples} synthetic calibration inputs")
    print(f"ResNet-20 compile: {base['seconds']:.2f} s (target < 2 s): {'OK' if base['seconds'] < 2 else 'MISSED'}")
    for r in rows[1:]:
        print(f"{r['name']} vs ResNet-20: weights x{r['weights'] / base['weights']:.1f}, "
              f"time x{r['seconds'] / base['seconds']:.1f}, "
              f"time-per-weight ratio {(r['seconds'] / r['weights']) / (base['seconds'] / base['weights']):.2f}")
    slow = max(rows, key=lambda r: r["seconds"])
    print(f"slowest passes of {slow['name']}: " + ", ".join(f"{k} {v:.2f}s" for k, v in
                                                            sorted(slow["passes"].items(), key=lambda kv: -kv[1])[:4]))


if __name__ == "__main__":
    main()
