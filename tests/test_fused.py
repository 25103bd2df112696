"""The fused array op (ConvAdcRecombine[NonIdeal]): native kernel == function body == numpy,
over conv shapes, input and cell bits, planes, tiles and slices, with and without the input
quantization and the epilogue (addend, per-channel scale and bias, residual, Relu); the session rewrite keeps
compiled models bit for bit; a portable (no AVX) build of the kernels gives the same values."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pimc
from helpers import adc_steps, conv_model
from pimc.core.chip import build_chip_config, transfer_lut
from pimc.core.mapping import read_mapping
from pimc.runtime import ops
from pimc.runtime.fuse import fuse_array_ops
from pimc.runtime.native import native_library
from pimc.runtime.session import open_session
from test_runtime import one_op_model

needs_native = pytest.mark.skipif(native_library() is None, reason="native kernels unavailable here "
                                  "(no onnxruntime headers: run 'pimc native --fetch-headers')")


@st.composite
def fused_cases(draw):
    P, G, T, S = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    coutg = draw(st.integers(1, 11))
    cg = draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    h = draw(st.integers(dil[0] * (kh - 1) + 1, 19))
    w = draw(st.integers(dil[1] * (kw - 1) + 1, 19))
    inputs = draw(st.sampled_from(["planes", "unsigned8", "signed8", "unsigned3", "signed4"]))
    cell = draw(st.sampled_from([(0, 1), (0, 1), (-1, 1), (-8, 7), (0, 15), (-128, 127)]))   # (0, 1) x planes: popcount
    return dict(P=P if inputs == "planes" else 1, G=G, T=T, S=S, coutg=coutg, cg=cg, k=(kh, kw), stride=stride,
                dil=dil, pads=pads, hw=(h, w), inputs=inputs, cell=cell, B=draw(st.integers(1, 3)),
                bits=draw(st.integers(2, 8)), seed=draw(st.integers(0, 2 ** 16)), gather=draw(st.booleans()),
                epilogue=draw(st.sampled_from(["none", "quantize", "affine", "both"])), relu=draw(st.booleans()))


def _epilogue(c, rng, x, out_shape):
    """The epilogue inputs (x_scale, addend, out_scale, out_bias) for c["epilogue"], and x: with
    "quantize"/"both" the float input the op quantizes (x_scale != 1; values past the range, and
    halves, so that clipping and round-half-even are exercised)."""
    f = np.float32
    one, zero = np.array(1.0, f), np.array(0.0, f)
    ep = {"x_scale": one, "addend": zero, "out_scale": one, "out_bias": zero, "residual": np.array(-0.0, f)}
    if c.get("epilogue", "none") in ("quantize", "both"):
        xs = f(rng.uniform(0.05, 3.0))
        xf = (x + rng.choice([0.0, 0.5, -0.5, 0.3, 2.0], x.shape)) * xs
        ep["x_scale"] = np.array(xs, f)
        x = xf.astype(f)
    if c.get("epilogue", "none") in ("affine", "both"):
        cout = out_shape[1]
        ep["addend"] = rng.standard_normal(out_shape).astype(f) * f(50)
        ep["out_scale"] = rng.uniform(-0.2, 0.2, (1, cout, 1, 1)).astype(f)
        ep["out_bias"] = rng.standard_normal((1, cout, 1, 1)).astype(f)
        # the residual Add: a tensor (with -0.0 and +0.0 in it, and sums of exactly 0), or a plain value
        if rng.random() < 0.7:
            res = rng.standard_normal(out_shape).astype(f) * f(20)
            flat = res.reshape(-1)
            flat[rng.random(flat.size) < 0.05] = -0.0
            flat[rng.random(flat.size) < 0.05] = 0.0
            ep["residual"] = res
        else:
            ep["residual"] = np.array(rng.standard_normal(), f)
    return x, ep


def _tensors(c):
    rng = np.random.default_rng(c["seed"])
    conv_groups = c["G"] * c["T"]
    cols = conv_groups * c["S"] * c["coutg"]
    lo, hi = {"planes": (0, 1), "unsigned8": (0, 255), "signed8": (-128, 127), "unsigned3": (0, 7),
              "signed4": (-8, 7)}[c["inputs"]]
    n_in = conv_groups * c["cg"]
    if c["gather"]:   # tile channels gathered from a wider input, some slots a zero channel
        cx = int(rng.integers(1, n_in + 3))
        chan = rng.integers(-1, cx + 1, n_in).astype(np.int64)
    else:
        cx, chan = n_in, np.arange(n_in, dtype=np.int64)
    x = rng.integers(lo, hi + 1, (c["P"] * c["B"], cx, *c["hw"])).astype(np.float32)
    w = rng.integers(c["cell"][0], c["cell"][1] + 1, (cols, c["cg"], *c["k"])).astype(np.float32)
    w[rng.random(w.shape) < 0.2] = 0   # padding slots and masked rows hold zeros
    k = c["cg"] * c["k"][0] * c["k"][1]
    smax = k * max(abs(lo), abs(hi)) * max(abs(c["cell"][0]), abs(c["cell"][1]))
    scale = adc_steps(rng, 0.5, max(1.0, smax / 2 ** c["bits"]), (1, cols, 1, 1))
    zp = np.round(rng.uniform(0, 2 ** c["bits"] - 1, (1, cols, 1, 1))).astype(np.float32)
    coef = rng.choice([1, 2, 4, -8, -1, 16], (c["P"], c["S"])).astype(np.float32)
    attrs = dict(strides=list(c["stride"]), pads=c["pads"], dilations=list(c["dil"]), group=conv_groups,
                 x_signed=int(c["inputs"].startswith("signed")),
                 x_bits={"planes": 1, "unsigned8": 8, "signed8": 8, "unsigned3": 3, "signed4": 4}[c["inputs"]],
                 bits=c["bits"], planes=c["P"], groups=c["G"], tiles=c["T"], slices=c["S"], relu=int(c.get("relu", 0)))
    oh = (c["hw"][0] + c["pads"][0] + c["pads"][2] - c["dil"][0] * (c["k"][0] - 1) - 1) // c["stride"][0] + 1
    ow = (c["hw"][1] + c["pads"][1] + c["pads"][3] - c["dil"][1] * (c["k"][1] - 1) - 1) // c["stride"][1] + 1
    x, ep = _epilogue(c, rng, x, (c["B"], c["G"] * c["coutg"], oh, ow))
    return rng, x, chan, w, scale, zp, coef, attrs, ep


def _run_three(op, x, consts, attrs, numpy_args):
    m = one_op_model(op, {"x": x}, consts, attrs)
    numpy_args = (consts["channels"], *numpy_args)
    body = open_session(m, native=False).run(None, {"x": x})[0]
    nat = open_session(m, native=True).run(None, {"x": x})[0]
    ref = ops.OPS[op].numpy(x, *numpy_args, **attrs)
    return body, nat, ref


@needs_native
@settings(max_examples=60, deadline=None)
@given(fused_cases())
def test_fused_ideal_three_ways(c):
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(c)
    body, nat, ref = _run_three("ConvAdcRecombine", x, {"channels": chan, "w": w, "scale": scale, "zp": zp,
                                                        "coef": coef, **ep}, attrs, (w, scale, zp, coef, *ep.values()))
    assert np.array_equal(nat, body), np.abs(nat - body).max()
    assert np.array_equal(body, ref)


@needs_native
@settings(max_examples=40, deadline=None)
@given(fused_cases(), st.sampled_from([0.0, 0.7]), st.booleans())
def test_fused_nonideal_three_ways(c, sigma, curve):
    rng, x, chan, w, scale, zp, coef, attrs, ep = _tensors(c)
    cols = w.shape[0]
    consts = {"channels": chan, "w": w, "scale": scale, "zp": zp,
              "gain": rng.normal(1, 0.05, (1, cols, 1, 1)).astype(np.float32),
              "offset": rng.normal(0, 1, (1, cols, 1, 1)).astype(np.float32),
              "lut": transfer_lut(build_chip_config(inl=1.5 if curve else 0.0), c["bits"]), "coef": coef, **ep}
    attrs = dict(attrs, noise_sigma=sigma, seed=int(c["seed"]))
    body, nat, ref = _run_three("ConvAdcRecombineNonIdeal", x, consts, attrs, tuple(consts.values())[1:])
    assert np.array_equal(nat, body), np.abs(nat - body).max()
    assert np.array_equal(body, ref)


@needs_native
def test_fused_kernel_rejects_what_it_cannot_compute_exactly():
    c = dict(P=1, G=1, T=1, S=1, coutg=2, cg=2, k=(1, 1), stride=(1, 1), dil=(1, 1), pads=[0] * 4, hw=(3, 3),
             inputs="unsigned8", cell=(0, 1), B=1, bits=4, seed=0, gather=False)
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(c)
    nan = x.copy()
    nan[0, 0, 1, 1] = np.nan
    for bad_x, bad_w, bad_c, bad_ep, bad_attrs, what in (
            (nan, w, chan, ep, attrs, "inputs must not be NaN"), (x, w * 200, chan, ep, attrs, "weights must"),
            (x, w, chan + 5, ep, attrs, "channels must"), (x, w, chan, ep, dict(attrs, x_bits=9), "x_bits must"),
            (x, w, chan, dict(ep, x_scale=np.ones(2, np.float32)), attrs, "x_scale must"),
            (x, w, chan, dict(ep, addend=np.ones((1, 2, 3, 2), np.float32)), attrs, "addend must"),
            (x, w, chan, dict(ep, out_bias=np.ones((1, 1, 1, 2), np.float32)), attrs, "out_bias must")):
        m = one_op_model("ConvAdcRecombine", {"x": bad_x}, {"channels": bad_c, "w": bad_w, "scale": scale, "zp": zp,
                                                            "coef": coef, **bad_ep}, bad_attrs)
        with pytest.raises(Exception, match=f"ConvAdcRecombine: {what}"):
            open_session(m, native=True).run(None, {"x": bad_x})


@needs_native
def test_fused_kernel_quantizes_as_quantize_input():
    """Inputs that are not integers in range are quantized (round half to even, clipped) as the
    body's QuantizeInput does; with x_scale 1 the integer inputs are taken as they are."""
    c = dict(P=1, G=1, T=1, S=1, coutg=3, cg=2, k=(1, 1), stride=(1, 1), dil=(1, 1), pads=[0] * 4, hw=(3, 4),
             inputs="signed4", cell=(-8, 7), B=2, bits=6, seed=1, gather=False)
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(c)
    x = np.array([-9.5, -8.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5, 300.0, -1e30, 3.0, -3.0], np.float32)
    x = np.resize(x, (2, 2, 3, 4)).astype(np.float32)
    body, nat, ref = _run_three("ConvAdcRecombine", x, {"channels": chan, "w": w, "scale": scale, "zp": zp,
                                                        "coef": coef, **ep}, attrs, (w, scale, zp, coef, *ep.values()))
    assert np.array_equal(nat, body) and np.array_equal(body, ref)


CASES = [dict(scheme="native", weight_bits=4, input_bits=8),
         dict(scheme="differential", weight_bits=8, input_bits=8, tile_mode="row"),
         dict(scheme="bit-serial", weight_bits=6, input_bits=4, cell_bits=2),
         dict(scheme="bit-serial+differential", weight_bits=4, input_bits=4, cell_bits=1),
         dict(scheme="differential", weight_bits=9, input_bits=5)]   # 9-bit cells: not fused


@needs_native
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c["scheme"] + str(c["weight_bits"]))
def test_compiled_models_fused_equal_unfused(tmp_path, cfg):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 10, 3, 3)).astype(np.float32)
    x = np.abs(rng.standard_normal((12, 10, 9, 9))).astype(np.float32)   # enough values for a curve table
    np.save(tmp_path / "c.npy", x)
    res = pimc.compile_model(conv_model(w, None, stride=(1, 1), pad=(1, 1, 1, 1)), calib_data=str(tmp_path / "c.npy"),
                             array_rows=40, adc_bits=5, **cfg)
    fused, n = fuse_array_ops(res.model)
    assert n == (0 if cfg["weight_bits"] == 9 else len(read_mapping(res.model).layers[0].chunk_list))
    left = [nd.op_type for nd in fused.graph.node]
    if n:   # the layer's QuantizeInput (unless bit planes read it), Sum of chunks, Mul and Add went in
        assert "Sum" not in left and "Mul" not in left and "Add" not in left, left
        assert ("QuantizeInput" in left) == cfg["scheme"].startswith("bit-serial"), left
    curve = build_chip_config(adc="nonideal", inl=1.5, noise_sigma=0.5)   # tabulated where the sums are small
    for chip in (None, "nonideal", "pimqat-chip7", curve):
        a = open_session(res.model, chip, chip_seed=2, native=False).run(None, {"x": x})[0]
        b = open_session(res.model, chip, chip_seed=2, fuse=False).run(None, {"x": x})[0]
        f = open_session(res.model, chip, chip_seed=2).run(None, {"x": x})[0]
        assert np.array_equal(f, b) and np.array_equal(f, a), chip


@needs_native
@pytest.mark.parametrize("single", [False, True], ids=["planes-tiles-slices", "single-term"])
def test_portable_build_gives_the_same_values(tmp_path, single):
    """PIMC_NATIVE_PORTABLE=1 builds for the baseline x86-64 (no AVX: the portable integer
    loops) into its own cache entry; its fused results equal this machine's build."""
    c = dict(P=2, G=2, T=2, S=2, coutg=5, cg=7, k=(3, 3), stride=(1, 1), dil=(1, 1), pads=[1] * 4, hw=(11, 10),
             inputs="planes", cell=(-8, 7), B=3, bits=5, seed=11, gather=True)
    if single:
        c = dict(c, P=1, T=1, S=1, inputs="signed4", hw=(11, 19))
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(dict(c, epilogue="both"))
    if single:
        coef = np.full((1, 1), -1.0, np.float32)
    m = one_op_model("ConvAdcRecombine", {"x": x}, {"channels": chan, "w": w, "scale": scale, "zp": zp, "coef": coef,
                                                    **ep}, attrs)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np; from pimc.runtime.native import isa, native_library; "
            "from pimc.runtime.session import open_session; "
            "print(isa(native_library())); "
            f"np.save(r'{tmp_path / 'y.npy'}', open_session(r'{tmp_path / 'm.onnx'}', native=True)"
            f".run(None, {{'x': np.load(r'{tmp_path / 'x.npy'}')}})[0])")
    env = dict(os.environ, PIMC_NATIVE_PORTABLE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "portable"
    here = open_session(m, native=True).run(None, {"x": x})[0]
    assert np.array_equal(np.load(tmp_path / "y.npy"), here)


@needs_native
@pytest.mark.parametrize("hw,k,cg,pads,dil", [((9, 11), (3, 3), 14, [1] * 4, (1, 1)), ((5, 40), (3, 3), 40, [1, 0, 2, 1], (1, 2)),
                                              ((1, 1), (1, 1), 70, [0] * 4, (1, 1))])
def test_binary_products_take_popcount_and_match(hw, k, cg, pads, dil):
    """Bit planes times 1-bit cells (stride 1) take the AND + popcount path where the CPU has
    it (`pimc native` prints vnni+popcount); its values equal the body's and numpy's."""
    c = dict(P=3, G=1, T=2, S=2, coutg=9, cg=cg, k=k, stride=(1, 1), dil=dil, pads=pads, hw=hw, inputs="planes",
             cell=(0, 1), B=2, bits=6, seed=5, gather=True)
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(dict(c, epilogue="both"))
    body, nat, ref = _run_three("ConvAdcRecombine", x, {"channels": chan, "w": w, "scale": scale, "zp": zp,
                                                        "coef": coef, **ep}, attrs, (w, scale, zp, coef, *ep.values()))
    assert np.array_equal(nat, body) and np.array_equal(body, ref)


@needs_native
@settings(max_examples=40, deadline=None)
@given(fused_cases(), st.sampled_from([(1, 1), (2, 1), (1, 2)]), st.sampled_from([1.0, -1.0]),
       st.sampled_from([1.0, -1.0]), st.sampled_from([1.0, 1e-6, 3e4]))
def test_fused_one_and_two_term_paths(c, ts, k0, k1, spread):
    """One-plane chunks with one or two terms of coefficient +-1 (native and differential chunks)
    take the kernel's one-pass paths, summing in float32 where that equals the float64 sum (the
    scales within 2^27 / 2^bits of each other; ``spread`` puts some columns' scales far
    apart, where the float64 sum stays): same values."""
    c = dict(c, P=1, T=ts[0], S=ts[1], inputs="unsigned8" if c["inputs"] == "planes" else c["inputs"])
    _, x, chan, w, scale, zp, coef, attrs, ep = _tensors(c)
    scale = scale.copy()
    scale[:, ::3] *= np.float32(spread)
    coef = np.array([[k0, k1][:ts[1]]], np.float32)
    body, nat, ref = _run_three("ConvAdcRecombine", x, {"channels": chan, "w": w, "scale": scale, "zp": zp,
                                                        "coef": coef, **ep}, attrs, (w, scale, zp, coef, *ep.values()))
    assert np.array_equal(nat, body), np.abs(nat - body).max()
    assert np.array_equal(body, ref)
    rng = np.random.default_rng(c["seed"] + 1)   # the non-ideal twin (noise and a curve) on the same paths
    cols = w.shape[0]
    consts = {"channels": chan, "w": w, "scale": scale, "zp": zp,
              "gain": rng.normal(1, 0.05, (1, cols, 1, 1)).astype(np.float32),
              "offset": rng.normal(0, 1, (1, cols, 1, 1)).astype(np.float32),
              "lut": transfer_lut(build_chip_config(inl=1.5), c["bits"]), "coef": coef, **ep}
    body, nat, ref = _run_three("ConvAdcRecombineNonIdeal", x, consts, dict(attrs, noise_sigma=0.7, seed=int(c["seed"])),
                                tuple(consts.values())[1:])
    assert np.array_equal(nat, body), np.abs(nat - body).max()
    assert np.array_equal(body, ref)
    assert not np.any(np.signbit(nat) & (nat == 0)) or c["epilogue"] in ("affine", "both")


def residual_block_model(rng, c=4):
    """x -> Conv(bias) -> Add(x) -> Relu -> Conv -> Relu -> y: a ResNet block's residual Add and
    both Relus follow array convs."""
    from onnx import helper, numpy_helper as nh, TensorProto
    w1, w2 = (rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3 for _ in range(2))
    inits = [nh.from_array(w1, "W1"), nh.from_array(rng.standard_normal(c).astype(np.float32), "B1"),
             nh.from_array(w2, "W2")]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", **conv),
             helper.make_node("Add", ["x", "c1"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2", **conv),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@needs_native
@pytest.mark.parametrize("scheme", ["native", "differential", "bit-serial"])
def test_residual_add_and_relu_go_into_the_fused_op(tmp_path, scheme):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 6, 6)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    res = pimc.compile_model(residual_block_model(rng), calib_data=str(tmp_path / "c.npy"), scheme=scheme,
                             weight_bits=4, input_bits=4, adc_bits=5, array_rows=18)
    fused, n = fuse_array_ops(res.model)
    left = [nd.op_type for nd in fused.graph.node]
    assert "Add" not in left and "Relu" not in left, left
    last = {}
    for nd in fused.graph.node:
        if nd.op_type.startswith("ConvAdcRecombine"):
            last[nd.output[0]] = nd
    relus = [nd for nd in last.values() if any(a.name == "relu" and a.i == 1 for a in nd.attribute)]
    assert len(relus) == 2 and any(not nd.input[-1].endswith("neg_zero") for nd in relus)
    for chip in (None, "pimqat-chip7", build_chip_config(adc="nonideal", inl=1.5, noise_sigma=0.5)):
        a = open_session(res.model, chip, chip_seed=2, native=False).run(None, {"x": x})[0]
        b = open_session(res.model, chip, chip_seed=2, fuse=False).run(None, {"x": x})[0]
        f = open_session(res.model, chip, chip_seed=2).run(None, {"x": x})[0]
        assert np.array_equal(f, b) and np.array_equal(f, a), chip
        assert (f >= 0).all() or np.isnan(f).any()
