"""Small ONNX models built in the tests, and running them."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper as nh

from pimc.runtime import open_session


def conv_model(w, b=None, *, stride=(1, 1), pad=(0, 0, 0, 0), dil=(1, 1), group=1, opset=17, bn=None,
               dynamic=True, in_shape=None):
    cout, cin_g, kh, kw = w.shape
    cin = cin_g * group
    inits = [nh.from_array(w.astype(np.float32), "W")]
    ins = ["x", "W"]
    if b is not None:
        inits.append(nh.from_array(b.astype(np.float32), "B"))
        ins.append("B")
    nodes = [helper.make_node("Conv", ins, ["c" if bn is not None else "y"], name="conv", strides=list(stride),
                              pads=list(pad), dilations=list(dil), group=group, kernel_shape=[kh, kw])]
    if bn is not None:
        g, beta, mean, var = bn
        for n, a in zip(("g", "beta", "mean", "var"), bn):
            inits.append(nh.from_array(a.astype(np.float32), n))
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], name="bn"))
    shape = in_shape or (["N", cin, "H", "W"] if dynamic else None)
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", cout, "OH", "OW"])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def gemm_model(w_kn, b=None, *, matmul=False, trans_b=False):
    k, n = w_kn.shape
    inits = [nh.from_array((w_kn.T if trans_b else w_kn).astype(np.float32), "W")]
    if matmul:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    else:
        ins = ["x", "W"]
        if b is not None:
            inits.append(nh.from_array(b.astype(np.float32), "B"))
            ins.append("B")
        nodes = [helper.make_node("Gemm", ins, ["y"], name="fc", transB=int(trans_b))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def run(model, x):
    return open_session(model).run(None, {"x": x})[0]


def adc_steps(rng, lo: float, hi: float, shape) -> np.ndarray:
    """ADC steps for kernel tests: uniform in [lo, hi), with about 40 % powers of two from 1/4 to
    8 (1 included: lossless columns), which the kernels divide by multiplying with the exact
    reciprocal (and where s / d often lies half-way between two integers)."""
    d = rng.uniform(lo, hi, shape).astype(np.float32)
    pow2 = rng.random(shape) < 0.4
    d[pow2] = 2.0 ** rng.integers(-2, 4, int(pow2.sum()))
    return d
