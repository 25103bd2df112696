"""The op library (function body == native kernel == numpy), ADC/device models, chips, `pimc run`."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper as nh

import pimc
from helpers import adc_steps, conv_model
from pimc.cli import main
from pimc.runtime import ops
from pimc.core.chip import build_chip_config, read_lut_csv, transfer_lut
from pimc.runtime.chip import instantiate
from pimc.runtime.native import native_library
from pimc.runtime.session import open_session

needs_native = pytest.mark.skipif(native_library() is None, reason="native kernels unavailable here "
                                  "(no onnxruntime headers: run 'pimc native --fetch-headers')")


def one_op_model(op, inputs: dict, consts: dict, attrs: dict, out_rank=4):
    names = list(inputs) + list(consts)
    node = helper.make_node(op, names, ["y"], domain=ops.DOMAIN, **attrs)
    g = helper.make_graph([node], "t",
                          [helper.make_tensor_value_info(k, 1, [f"d{i}_{k}" for i in range(v.ndim)]) for k, v in inputs.items()],
                          [helper.make_tensor_value_info("y", 1, [f"o{i}" for i in range(out_rank)])],
                          [nh.from_array(v, k) for k, v in consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                          functions=ops.function_protos([op]))
    m.ir_version = 10
    return m


def run_both(m, feed):
    body = open_session(m, native=False).run(None, feed)[0]
    nat = open_session(m, native=True).run(None, feed)[0] if native_library() is not None else body
    return body, nat


shapes = st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 5), st.integers(1, 6))


@needs_native
@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 8), st.booleans(), st.integers(0, 2 ** 16))
def test_quantize_input_and_bit_planes_three_ways(shape, bits, signed, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    scale = np.float32(rng.uniform(0.01, 0.5))
    m = one_op_model("QuantizeInput", {"x": x}, {"scale": np.array(scale, np.float32)}, {"bits": bits, "signed": int(signed)})
    body, nat = run_both(m, {"x": x})
    ref = ops.quantize_input_np(x, scale, bits=bits, signed=int(signed))
    assert np.array_equal(body, ref) and np.array_equal(nat, ref)
    m = one_op_model("BitPlanes", {"q": ref}, {}, {"bits": bits, "signed": int(signed)})
    body, nat = run_both(m, {"q": ref})
    planes = ops.bit_planes_np(ref, bits=bits, signed=int(signed))
    assert np.array_equal(body, planes) and np.array_equal(nat, planes)
    w = ops.plane_weights(bits, int(signed)).reshape(bits, *[1] * len(shape))
    assert np.array_equal((planes.reshape(bits, *shape) * w).sum(0), ref)   # planes recombine to q


@needs_native
@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 9), st.integers(0, 2 ** 16), st.booleans())
def test_adc_quantize_three_ways(shape, bits, seed, scalar):
    rng = np.random.default_rng(seed)
    c = shape[1]
    s = np.round(rng.standard_normal(shape) * 50).astype(np.float32)
    cshape = (1, 1, 1, 1) if scalar else (1, c, 1, 1)
    scale = adc_steps(rng, 0.5, 9, cshape)
    zp = np.round(rng.uniform(-5, 2 ** bits, cshape)).astype(np.float32)
    m = one_op_model("AdcQuantize", {"s": s}, {"scale": scale, "zp": zp}, {"bits": bits})
    body, nat = run_both(m, {"s": s})
    ref = ops.adc_quantize_np(s, scale, zp, bits=bits)
    assert np.array_equal(body, ref) and np.array_equal(nat, ref)


def test_adc_rounds_half_to_even():
    s = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5], np.float32).reshape(1, 1, 1, 6)
    m = one_op_model("AdcQuantize", {"s": s}, {"scale": np.ones((1, 1, 1, 1), np.float32),
                                              "zp": np.full((1, 1, 1, 1), 8, np.float32)}, {"bits": 5})
    for native in ([False, True] if native_library() is not None else [False]):
        y = open_session(m, native=native).run(None, {"s": s})[0]
        assert y.reshape(-1).tolist() == [0, 2, 2, 4, 0, -2]


@needs_native
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2 ** 16))
def test_recombine_three_ways(P, G, T, S, cout_g, B, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((P * B, G * T * S * cout_g, 3, 2)) * rng.uniform(1, 100)).astype(np.float32)
    coef = rng.choice([1, 2, 4, -8, -1], (P, S)).astype(np.float32)
    m = one_op_model("Recombine", {"a": a}, {"coef": coef}, {"planes": P, "groups": G, "tiles": T, "slices": S})
    body, nat = run_both(m, {"a": a})
    ref = ops.recombine_np(a, coef, planes=P, groups=G, tiles=T, slices=S)
    assert np.array_equal(body, ref) and np.array_equal(nat, ref)


def _nonideal_model(bits=6, sigma=0.8, seed=5, c=4):
    rng = np.random.default_rng(0)
    consts = {"scale": rng.uniform(1, 3, (1, c, 1, 1)).astype(np.float32),
              "zp": np.full((1, c, 1, 1), 2 ** (bits - 1), np.float32),
              "gain": rng.normal(1, 0.03, (1, c, 1, 1)).astype(np.float32),
              "offset": rng.normal(0, 1, (1, c, 1, 1)).astype(np.float32),
              "lut": transfer_lut(build_chip_config(inl=1.5), bits)}
    return consts, lambda s: one_op_model("AdcQuantizeNonIdeal", {"s": s}, consts,
                                           {"bits": bits, "noise_sigma": sigma, "seed": seed})


def test_nonideal_adc_body_matches_numpy_and_native_statistically():
    consts, make = _nonideal_model()
    s = np.round(np.random.default_rng(1).standard_normal((8, 4, 16, 16)) * 40).astype(np.float32)
    m = make(s)
    body, nat = run_both(m, {"s": s})
    ref = ops.adc_quantize_nonideal_np(s, *consts.values(), bits=6, noise_sigma=0.8, seed=5)
    assert np.mean(body == ref) > 0.999            # identical integers; libm may differ in the last ulp
    assert np.mean(nat == body) > 0.999
    # noise statistics: with gain 1, offset 0 and a linear curve, code - ideal code ~ round(N(0, sigma))
    c = dict(consts, scale=np.ones_like(consts["scale"]), gain=np.ones_like(consts["gain"]), offset=np.zeros_like(consts["offset"]),
             lut=np.arange(64, dtype=np.float32))
    s2 = np.zeros((64, 4, 16, 16), np.float32) + np.arange(64, dtype=np.float32).reshape(64, 1, 1, 1) % 7
    m2 = one_op_model("AdcQuantizeNonIdeal", {"s": s2}, c, {"bits": 6, "noise_sigma": 0.8, "seed": 9})
    for y in run_both(m2, {"s": s2}):
        err = (y - ops.adc_quantize_np(s2, c["scale"], c["zp"], bits=6)) / c["scale"]
        assert abs(err.mean()) < 0.02 and abs(err.std() - np.sqrt(0.8 ** 2 + 1 / 12)) < 0.03


def test_noise_is_independent_of_batch_and_reproducible():
    _, make = _nonideal_model()
    s = np.round(np.random.default_rng(2).standard_normal((10, 4, 5, 5)) * 30).astype(np.float32)
    m = make(s)
    for native in ([False, True] if native_library() is not None else [False]):
        sess = open_session(m, native=native)
        full = sess.run(None, {"s": s})[0]
        assert np.array_equal(full, sess.run(None, {"s": s})[0])        # every run
        perm = np.random.default_rng(0).permutation(10)
        assert np.array_equal(sess.run(None, {"s": s[perm]})[0], full[perm])   # batch composition
        assert np.array_equal(sess.run(None, {"s": s[3:4]})[0], full[3:4])    # batch size


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("chip")
    rng = np.random.default_rng(4)
    m = conv_model(rng.standard_normal((8, 12, 3, 3)).astype(np.float32), None, pad=(1, 1, 1, 1))
    np.save(d / "c.npy", np.abs(rng.standard_normal((8, 12, 6, 6))).astype(np.float32))
    res = pimc.compile_model(m, scheme="bit-serial+differential", weight_bits=4, input_bits=4, cell_bits=1,
                             array_rows=36, adc_bits=5, calib_data=str(d / "c.npy"), chunk_mib=1)
    x = np.abs(rng.standard_normal((9, 12, 6, 6))).astype(np.float32)
    return res, x, d


def test_chip_instances_are_reproducible_and_distinct(compiled):
    res, x, _ = compiled
    assert len(res.mapping["layers"][0]["chunks"]) > 1          # chunked: draws must not depend on it
    chip = build_chip_config(adc="nonideal", noise_sigma=0.3, inl=0.5, device_sigma_cell=0.05, device_sigma_chip=0.02)
    a = open_session(res.model, chip, chip_seed=1).run(None, {"x": x})[0]
    b = open_session(res.model, chip, chip_seed=1).run(None, {"x": x})[0]
    c = open_session(res.model, chip, chip_seed=2).run(None, {"x": x})[0]
    ideal = open_session(res.model).run(None, {"x": x})[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, ideal)
    one = open_session(res.model, chip, chip_seed=1).run(None, {"x": x[4:5]})[0]
    assert np.array_equal(one, a[4:5])
    perm = np.arange(9)[::-1]
    assert np.array_equal(open_session(res.model, chip, chip_seed=1).run(None, {"x": x[perm]})[0], a[perm])


def test_static_draws_follow_the_chip_model(compiled):
    res, _, _ = compiled
    chip = build_chip_config(adc="nonideal", gain_sigma=0.05, offset_sigma=2.0, device_sigma_cell=0.1, chip_seed=3)
    inst = instantiate(res.model, chip)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in inst.graph.initializer}
    gains = np.concatenate([v.reshape(-1) for k, v in init.items() if "chip_gain" in k])
    offs = np.concatenate([v.reshape(-1) for k, v in init.items() if "chip_offset" in k])
    assert gains.size == res.mapping["layers"][0]["adc"]["columns"]
    assert abs(gains.mean() - 1) < 0.02 and abs(gains.std() - 0.05) < 0.015
    assert abs(offs.mean()) < 0.5 and abs(offs.std() - 2.0) < 0.5
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    ratios = []
    for k, v in orig.items():
        if "array_weight" in k:
            w = init[k]
            assert np.all(w[v == 0] == 0)                   # a zero cell stays zero
            ratios.append(np.log(w[v != 0] / v[v != 0]))
    ratios = np.concatenate(ratios)
    assert ratios.size > 500 and abs(ratios.std() - 0.1) < 0.01 and abs(ratios.mean()) < 0.01
    assert {p.key for p in inst.metadata_props} >= {"pimc.chip", "pimc.mapping"}


def test_transfer_curves(tmp_path):
    lut = transfer_lut(build_chip_config(inl=2.0), 6)
    assert lut.shape == (64,) and abs(np.max(np.abs(lut - np.arange(64))) - 2.0) < 1e-3 and np.all(np.diff(lut) > 0)
    p = tmp_path / "curve.csv"
    p.write_text("code,level\n" + "".join(f"{k},{k + 0.1 * np.sin(k)}\n" for k in range(32)))
    got = read_lut_csv(p)
    assert got.shape == (32,) and abs(got[5] - (5 + 0.1 * np.sin(5))) < 1e-6
    assert transfer_lut(build_chip_config(lut_csv=str(p)), 5).shape == (32,)
    with pytest.raises(pimc.PimcError, match="levels"):
        transfer_lut(build_chip_config(lut_csv=str(p)), 6)
    p.write_text("1\n3\n2\n")
    with pytest.raises(pimc.PimcError, match="increasing"):
        read_lut_csv(p)


def test_hw_file_nonideal_table_and_preset(tmp_path):
    hw = tmp_path / "chip.toml"
    hw.write_text("[adc]\nbits = 7\n[nonideal]\nadc = 'nonideal'\nnoise_sigma = 0.4\ngain_sigma = 0.01\n")
    cfg = build_chip_config(preset="pimqat-chip7", hw=hw, offset_sigma=1.0)
    assert (cfg.adc, cfg.noise_sigma, cfg.gain_sigma, cfg.offset_sigma) == ("nonideal", 0.4, 0.01, 1.0)
    from pimc.core.config import build_config
    assert build_config(hw=hw).adc_bits == 7               # the compile side ignores [nonideal]


def test_pimc_run_cli(compiled, tmp_path, capsys):
    res, x, _ = compiled
    model = tmp_path / "m.pim.onnx"
    res.save(model)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    assert main(["run", str(model), "--input", str(tmp_path / "x.npy"), "--adc", "nonideal", "--chip-seed", "4",
                 "--batch-size", "4", "-o", str(out)]) == 0
    y = np.load(out)
    ref = open_session(res.model, "nonideal", chip_seed=4).run(None, {"x": x})[0]
    assert np.array_equal(y, ref)
    capsys.readouterr()
    plain = tmp_path / "plain.onnx"
    onnx.save(conv_model(np.ones((2, 12, 1, 1), np.float32), None), plain)
    for argv, needle in [(["run", str(model), "--input", str(tmp_path / "nope.npy")], "not found"),
                         (["run", str(plain), "--input", str(tmp_path / "x.npy"), "--adc", "nonideal"], "not a pimc"),
                         (["run", str(model), "--input", str(tmp_path / "bad.npy")], "shape"),
                         (["run", str(model), "--input", str(tmp_path / "f64.npy")], "float64")]:
        np.save(tmp_path / "bad.npy", np.zeros((2, 3, 6, 6), np.float32))
        np.save(tmp_path / "f64.npy", x.astype(np.float64))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_missing_headers_fall_back_to_function_bodies_once(tmp_path, compiled):
    res, x, _ = compiled
    res.save(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np; from pimc.runtime import open_session; "
            f"s = open_session(r'{tmp_path / 'm.onnx'}'); s = open_session(r'{tmp_path / 'm.onnx'}'); "
            f"print(s.run(None, {{'x': np.load(r'{tmp_path / 'x.npy'}')}})[0].shape)")
    env = dict(os.environ, PIMC_CACHE=str(tmp_path / "cache"), PIMC_ORT_INCLUDE=str(tmp_path / "none"))
    if any(os.path.isfile(os.path.join(d, "onnxruntime_cxx_api.h")) for d in
           ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime", "/usr/include", "/usr/local/include"]):
        pytest.skip("system headers present: the fallback cannot be provoked here")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("native kernels unavailable") == 1 and "(9, 8, 6, 6)" in r.stdout


@needs_native
@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(2, 7), st.integers(0, 2 ** 16), st.sampled_from([(3, 2), (17, 19)]))
def test_fused_adc_recombine_three_ways(P, G, T, S, cout_g, B, bits, seed, hw):
    # (17, 19): 323 values per column, more than one block of the native kernels' curve lookup
    check_fused_adc_recombine(P, G, T, S, cout_g, B, bits, seed, hw)


@needs_native
@pytest.mark.parametrize("P,T,S,cout_g,B,hw", [(2, 2, 2, 3, 40, (3, 4)), (2, 2, 2, 5, 70, (3, 4)),
                                              (2, 2, 2, 5, 1, (3, 4)), (1, 1, 1, 20, 64, (40, 41))])
def test_fused_adc_recombine_task_splits(P, T, S, cout_g, B, hw):
    # the native kernels cut a group's out channels into runs for small batches (at least
    # 64 tasks) and to keep a task's float64 accumulators within 256 KiB: 40 images x 3
    # channels -> runs of 1 and 2 channels; 70 -> one run; 1 image -> one run per channel;
    # 20 channels x 1640 values (256.25 KiB of accumulators) -> two runs of 10
    check_fused_adc_recombine(P, 1, T, S, cout_g, B, 5, 7, hw)


@needs_native
def test_fused_adc_recombine_empty_batch():
    # an empty batch gives an empty output (the native channel-run arithmetic divides by the batch size)
    P, S, cout, cols = 2, 2, 3, 6
    s = np.zeros((0, cols, 3, 4), np.float32)
    c = lambda v: np.full((1, cols, 1, 1), v, np.float32)
    attrs = {"bits": 5, "planes": P, "groups": 1, "tiles": 1, "slices": S}
    ideal = one_op_model("AdcRecombine", {"s": s}, {"scale": c(1), "zp": c(0), "coef": np.ones((P, S), np.float32)}, attrs)
    lut = (np.arange(32) + 0.1 * np.sin(np.arange(32))).astype(np.float32)
    noisy = one_op_model("AdcRecombineNonIdeal", {"s": s}, {"scale": c(1), "zp": c(0), "gain": c(1), "offset": c(0), "lut": lut,
                                                            "coef": np.ones((P, S), np.float32)},
                         {**attrs, "noise_sigma": 0.5, "seed": 1})
    unfused = one_op_model("AdcQuantizeNonIdeal", {"s": s}, {"scale": c(1), "zp": c(0), "gain": c(1), "offset": c(0),
                                                            "lut": lut}, {"bits": 5, "noise_sigma": 0.5, "seed": 1})
    for m, shape in ((ideal, (0, cout, 3, 4)), (noisy, (0, cout, 3, 4)), (unfused, s.shape)):
        for native in (True, False):   # the function bodies too (the noise key once reshaped s to (0, -1))
            assert open_session(m, native=native).run(None, {"s": s})[0].shape == shape


@needs_native
def test_fused_adc_recombine_tiny_noise():
    # the native kernels scale the noise by sigma*sqrt(3)/256 in one step where that is a
    # normal float, else as the function body does; 1e-37 LSB takes the second way
    check_fused_adc_recombine(2, 1, 1, 2, 3, 2, 6, 11, (17, 19), sigma=1e-37)


@needs_native
@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(2, 4), st.integers(3, 7),
       st.integers(0, 2 ** 16), st.sampled_from([(3, 8), (17, 19)]), st.sampled_from([0.6, 0.0]))
def test_nonideal_adc_small_integral_sums(P, T, S, cout_g, bits, seed, hw, sigma):
    # bit-serial sums of 1-bit cells are small integers: the native kernels then read the
    # curve's output from a per-column table (two permutes for groups of eight in [0, 15],
    # table loads for larger integers, the curve's steps for anything else): every way
    # must give the function body's values, -0.0, 0.5, huge and negative values included
    rng = np.random.default_rng(seed)
    s = rng.poisson(2.0, (P * 2, T * S * cout_g, *hw)).astype(np.float32)
    flat = s.reshape(-1)
    odd = rng.random(flat.size) < 0.02
    flat[odd] = rng.choice(np.array([-0.0, 0.5, 15.5, 16, 23, 37, 255, 1e6, -3, 1e-30], np.float32), odd.sum())
    cols = s.shape[1]
    for r, c in zip(rng.integers(0, P * 2, 4), rng.integers(0, cols, 4)):   # whole groups of integers above 15
        s[r, c].reshape(-1)[:8] = rng.integers(16, 21, 8)
    check_fused_adc_recombine(P, 1, T, S, cout_g, 2, bits, seed, hw, sigma=sigma, s=s)
    # the unfused conversion (AdcQuantizeNonIdeal) takes the same path
    c = {"scale": adc_steps(rng, 0.5, 6, (1, cols, 1, 1)),
         "zp": np.round(rng.uniform(0, 2 ** bits, (1, cols, 1, 1))).astype(np.float32),
         "gain": rng.normal(1, 0.05, (1, cols, 1, 1)).astype(np.float32),
         "offset": rng.normal(0, 1, (1, cols, 1, 1)).astype(np.float32),
         "lut": transfer_lut(build_chip_config(inl=0.7), bits)}
    m = one_op_model("AdcQuantizeNonIdeal", {"s": s}, c, {"bits": bits, "noise_sigma": sigma, "seed": seed})
    body, nat = run_both(m, {"s": s})
    assert np.array_equal(nat, body)


def check_fused_adc_recombine(P, G, T, S, cout_g, B, bits, seed, hw, sigma=0.6, s=None):
    rng = np.random.default_rng(seed)
    cols = G * T * S * cout_g
    if s is None:
        s = np.round(rng.standard_normal((P * B, cols, *hw)) * 30).astype(np.float32)
    scale = adc_steps(rng, 0.5, 6, (1, cols, 1, 1))
    zp = np.round(rng.uniform(0, 2 ** bits, (1, cols, 1, 1))).astype(np.float32)
    coef = rng.choice([1, 2, 4, -8, -1], (P, S)).astype(np.float32)
    rattrs = {"planes": P, "groups": G, "tiles": T, "slices": S}
    m = one_op_model("AdcRecombine", {"s": s}, {"scale": scale, "zp": zp, "coef": coef}, {"bits": bits, **rattrs})
    body, nat = run_both(m, {"s": s})
    ref = ops.adc_recombine_np(s, scale, zp, coef, bits=bits, **rattrs)
    assert np.array_equal(body, ref) and np.array_equal(nat, ref)
    lut = transfer_lut(build_chip_config(inl=0.7), bits)
    gain = rng.normal(1, 0.05, (1, cols, 1, 1)).astype(np.float32)
    off = rng.normal(0, 1, (1, cols, 1, 1)).astype(np.float32)
    m = one_op_model("AdcRecombineNonIdeal", {"s": s}, {"scale": scale, "zp": zp, "gain": gain, "offset": off,
                                                        "lut": lut, "coef": coef},
                     {"bits": bits, "noise_sigma": sigma, "seed": seed, **rattrs})
    body, nat = run_both(m, {"s": s})
    ref = ops.adc_recombine_nonideal_np(s, scale, zp, gain, off, lut, coef, bits=bits, noise_sigma=sigma, seed=seed, **rattrs)
    assert np.array_equal(body, ref) and np.array_equal(nat, ref)
