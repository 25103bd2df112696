"""Calibration methods (pimc.core.calibrators) against numpy references, their streaming
histograms, and the per-layer rules (--digital-layers, [[layer]]) reaching the IR."""
import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper

from pimc.cli import main
from pimc.core.config import build_config
from pimc.core.calibrators import Histograms, activation_ranges, adc_ranges, parse_method
from pimc.core.errors import PimcError
from pimc.core.mapping import read_mapping
from pimc.pipeline import compile_model

RNG = np.random.default_rng(11)


# ---- the methods on synthetic distributions ------------------------------------------

def _hist(x, bins=2048, integer=False, parts=1):
    h = Histograms(1, bins=bins, integer=integer)
    for p in np.array_split(np.asarray(x).ravel(), parts):
        h.update(p[None])
    return h


def _q_signed(x, t, bits):
    s = t / (2 ** (bits - 1) - 1)
    return np.clip(np.round(x / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * s


def _q_unsigned(x, t, bits):
    s = t / (2 ** bits - 1)
    return np.clip(np.round(x / s), 0, 2 ** bits - 1) * s


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_mse_clip_of_laplace_matches_brute_force(bits):
    """The MSE-optimal clip of a Laplace(0, 1) sample, from the streamed histogram, equals a
    brute-force search of the exact quantizer on the raw samples within 2 %."""
    x = RNG.laplace(0, 1, 200_000).astype(np.float32)
    for signed, q, data in ((True, _q_signed, x), (False, _q_unsigned, np.abs(x))):
        lo, hi = activation_ranges(_hist(data, parts=7), parse_method("mse", "t"), bits)
        ts = np.linspace(1, 13, 601)
        ref = ts[np.argmin([np.mean((q(data, t, bits) - data) ** 2) for t in ts])]
        assert abs(hi[0] - ref) / ref < 0.02, (bits, signed, hi[0], ref)
        assert (lo[0] < 0) == signed


def test_mse_clip_of_laplace_4_bits_is_the_known_optimum():
    """Closed form (ACIQ, Banner et al.): the MSE-optimal symmetric clip of Laplace(0, b) for
    2^M uniform levels over [-a, a] is about 5.03 b at M = 4; pimc's signed 4-bit grid has 15
    levels over [-a, a] (plus one), so its optimum lies a little lower: between 4.4 b and 5.1 b."""
    b = 2.0
    x = RNG.laplace(0, b, 400_000).astype(np.float32)
    _, hi = activation_ranges(_hist(x), parse_method("mse", "t"), 4)
    assert 4.4 * b < hi[0] < 5.1 * b


def test_percentile_matches_numpy_and_onnxruntime():
    from onnxruntime.quantization.calibrate import HistogramCollector
    x = RNG.standard_normal(300_000).astype(np.float32)
    for p in (99.0, 99.9, 99.99):
        _, hi = activation_ranges(_hist(x, parts=5), parse_method(f"percentile:{p}", "t"), 8)
        ref = np.percentile(np.abs(x), p)
        hc = HistogramCollector("percentile", True, 2048, 128, p, "same")
        hc.collect_absolute_value({"t": x})
        ort = hc.compute_percentile()["t"][1]
        width = np.abs(x).max() / 1000
        assert abs(hi[0] - ref) < 2 * width and abs(hi[0] - ort) < 3 * width, (p, hi[0], ref, ort)


def test_entropy_is_near_onnxruntime_and_keeps_uniform_data_whole():
    from onnxruntime.quantization.calibrate import HistogramCollector
    x = RNG.laplace(0, 1, 500_000).astype(np.float32)
    _, hi = activation_ranges(_hist(x), parse_method("entropy", "t"), 4)
    hc = HistogramCollector("entropy", True, 2048, 16, 99.99, "same")
    hc.collect_value({"t": x})
    ort = float(hc.get_entropy_threshold(hc.histogram_dict["t"], 16)[1])
    assert abs(hi[0] - ort) / ort < 0.15, (hi[0], ort)   # same criterion; the level grids differ
    u = RNG.uniform(0, 1, 200_000).astype(np.float32)
    _, hu = activation_ranges(_hist(u), parse_method("entropy", "t"), 4)
    assert hu[0] > 0.97 * u.max()
    # a ReLU-like spike of zeros does not pull the range to 0
    r = np.maximum(x, 0)
    _, hr = activation_ranges(_hist(r), parse_method("entropy", "t"), 4)
    assert hr[0] > 0.2 * r.max()


def test_adc_ranges_integer_columns():
    """Integer partial sums: lossless columns stay whole under every method (the histogram methods
    also spend the spare levels on margins, here all above 0, and on a signed column on both
    sides), percentile cuts both tails evenly, max is the exact range widened to 0, all
    deterministic."""
    from pimc.core.calibrators import _with_spare_levels
    lo, hi = _with_spare_levels(np.array([-3.0]), np.array([9.0]), 4)
    assert (lo[0], hi[0]) == (-3, 12)
    s = np.round(RNG.normal(40, 12, (3, 50_000))).astype(np.float32)
    s[2] = RNG.integers(0, 10, 50_000)   # 10 levels: lossless at 4 bits
    h = Histograms(3, bins=512, integer=True)
    for part in np.array_split(s, 9, axis=1):
        h.update(part)
    lo, hi = adc_ranges(h, parse_method("max", "t"), 4)
    assert np.array_equal(lo, np.minimum(s.min(1), 0)) and np.array_equal(hi, s.max(1))
    for m in ("percentile:99", "mse", "entropy"):
        lo2, hi2 = adc_ranges(h, parse_method(m, "t"), 4)
        # the lossless column keeps its 10 levels, the spare ones above (it never goes negative)
        assert (lo2[2], hi2[2]) == (0, 15), m
        assert np.all(hi2[:2] <= hi[:2]) and np.all(hi2[:2] > 40), m
        assert np.array_equal((lo2, hi2), adc_ranges(h, parse_method(m, "t"), 4)), m
    lo3, hi3 = adc_ranges(h, parse_method("percentile:99", "t"), 4)
    assert np.allclose(hi3[:2], np.percentile(s[:2], 99.5, axis=1), atol=1)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10 ** 6), st.booleans())
def test_streamed_histogram_equals_one_shot(parts, seed, integer):
    """Bin widths double as values grow (pairs merge exactly): streaming the data in parts gives
    the histogram of all of it at once."""
    rng = np.random.default_rng(seed)
    x = rng.laplace(0, 1, (2, 3000)) * np.geomspace(1, 300, 3000)     # growing magnitudes
    x = np.round(x) if integer else x.astype(np.float32)
    one = Histograms(2, bins=256, integer=integer)
    one.update(x)
    many = Histograms(2, bins=256, integer=integer)
    for p in np.array_split(x, parts, axis=1):
        many.update(p)
    if np.array_equal(one.width, many.width):
        assert np.array_equal(one.counts, many.counts)
    else:   # a first part with a smaller range started finer: merge the one-shot result's view
        assert np.all(many.width >= one.width)
    assert many.counts.sum() == x.size and np.array_equal(many.hi, x.max(1))


@pytest.mark.parametrize("text,msg", [("foo", "not a calibration method"), ("percentile:101", "(50, 100]"),
                                      ("percentile:x", "must be a number"), ("mse:3", "takes no parameter")])
def test_bad_methods_are_one_line_errors(text, msg):
    with pytest.raises(PimcError, match=msg.replace("(", r"\(").replace("]", r"\]")):
        parse_method(text, "--act-calib")


# ---- on models --------------------------------------------------------------------

def _two_conv_model(hw=8, stride=1):
    """Conv(4 -> 8, 3x3, ``stride``) 'first_conv' -> Relu -> Conv(8 -> 6, 3x3) 'second_conv' on
    hw x hw inputs."""
    w1 = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((6, 8, 3, 3)).astype(np.float32)
    out = hw // stride
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="first_conv", pads=[1, 1, 1, 1], strides=[stride] * 2),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="second_conv", pads=[1, 1, 1, 1])],
        "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, hw, hw])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, out, out])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _two_layers(tmp_path):
    p = tmp_path / "two.onnx"
    onnx.save(_two_conv_model(), p)
    np.save(tmp_path / "calib.npy", RNG.standard_normal((40, 4, 8, 8)).astype(np.float32))
    return p


def _layers(res):
    return {L["name"]: L for L in res.mapping["layers"]}


def test_digital_layers_and_layer_tables_reach_the_ir(tmp_path):
    src = _two_layers(tmp_path)
    calib = str(tmp_path / "calib.npy")
    res = compile_model(src, scheme="differential", adc_bits=5, calib_data=calib, digital_layers="first")
    L = _layers(res)
    assert "tiling" not in L["first_conv"] and L["first_conv"]["weight_quant"] and L["first_conv"]["scheme"] == "digital"
    assert L["first_conv"]["rules"] == ["--digital-layers first"]
    assert L["second_conv"]["adc"]["bits"] == 5 and L["second_conv"]["scheme"] == "differential"
    hw = tmp_path / "hw.toml"
    hw.write_text('[calibration]\nact_calib = "percentile:99.9"\nadc_calib = "entropy"\n')
    c = build_config(hw=hw)
    assert (c.act_calib, c.adc_calib) == ("percentile:99.9", "entropy")
    hw.write_text('[adc]\nbits = 6\n\n[[layer]]\nmatch = "second_*"\nadc_bits = 3\nscheme = "native"\n'
                  'adc_calib = "percentile:99"\n\n[[layer]]\nmatch = "w1"\nscheme = "float"\n')
    res = compile_model(src, hw=hw, calib_data=calib, act_calib="mse", adc_range="calibrated")
    L = _layers(res)
    assert "input_quant" not in L["first_conv"] and L["first_conv"]["scheme"] == "float"
    s = L["second_conv"]
    assert s["adc"]["bits"] == 3 and s["adc"]["calibration"] == "percentile:99" and s["scheme"] == "native"
    assert s["input_quant"]["calibration"] == "mse" and len(s["slicing"]["weight_slices"]) == 1
    # the IR's ADC node carries the per-layer bits
    adc = [n for n in res.model.graph.node if n.op_type.startswith("Adc")]
    assert adc and all(a.i for n in adc for a in n.attribute if a.name == "bits" and a.i == 3)


def test_lossless_adc_equals_digital_with_histogram_calibration(tmp_path):
    """With mse activation calibration and a first layer kept digital, a lossless ADC still
    reproduces the digital model (same calibration, same rules) bit for bit."""
    from helpers import run
    from pimc.evaluate import digital_variant
    src = _two_layers(tmp_path)
    x = np.load(tmp_path / "calib.npy")
    res = compile_model(src, scheme="native", adc_bits=16, weight_bits=4, input_bits=4, calib_inputs=x, act_calib="mse",
                        digital_layers="first")
    dig = compile_model(src, digital_variant(res.pim.config), calib_inputs=x)
    assert np.array_equal(run(res.model, x[:8]), run(dig.model, x[:8]))


def test_compiles_are_deterministic(tmp_path):
    src = _two_layers(tmp_path)
    x = np.load(tmp_path / "calib.npy")
    kw = dict(scheme="bit-serial+differential", adc_bits=3, calib_inputs=x, act_calib="entropy", adc_calib="mse")
    a, b = compile_model(src, **kw), compile_model(src, **kw)
    assert json.dumps(a.mapping["layers"], sort_keys=True) == json.dumps(b.mapping["layers"], sort_keys=True)


def _bad(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("pimc: error: "), err
    return lines[0]


def test_cli_bad_calibration_and_layer_rules(tmp_path, capsys):
    src = _two_layers(tmp_path)
    out = tmp_path / "o.onnx"
    base = ["compile", str(src), "-o", str(out), "--calib-data", str(tmp_path / "calib.npy")]
    assert "--act-calib" in _bad(capsys, base + ["--act-calib", "foo"])
    assert "percentile" in _bad(capsys, base + ["--adc-calib", "percentile:101"])
    msg = _bad(capsys, base + ["--digital-layers", "first,/nope/*"])
    assert "'/nope/*' matches no mapped layer" in msg and "first_conv" in msg
    hw = tmp_path / "hw.toml"
    hw.write_text('[[layer]]\nmatch = "nothing*"\nadc_bits = 3\n')
    assert "[[layer]] #1" in _bad(capsys, base + ["--hw", str(hw)])
    hw.write_text('[[layer]]\nmatch = "first"\nseed = 3\n')
    assert "cannot be set per layer" in _bad(capsys, base + ["--hw", str(hw)])
    hw.write_text('[[layer]]\nmatch = "first"\nadc_bits = 40\n')
    assert "layer 'first_conv'" in _bad(capsys, base + ["--hw", str(hw)])
    assert not out.exists()
    assert main(base + ["--act-calib", "percentile:99.9", "--adc-calib", "mse", "--digital-layers", "last", "-q"]) == 0
    assert read_mapping(onnx.load(out), "o").layers[1].scheme == "digital"


def test_sampled_adc_calibration_equals_the_full_run(tmp_path, monkeypatch):
    """calibrate_sampled (strided array convs, digital accumulators) reads exactly the partial sums
    the full sliced model gives at every k-th row and column: the same ranges as the full run,
    here with k = 4 (16x16 maps), for every histogram method and a bit-serial scheme."""
    from pimc.passes import insert_adc
    src = _two_conv_model(hw=32, stride=2)
    x = RNG.standard_normal((24, 4, 32, 32)).astype(np.float32)
    used = []
    real = insert_adc.calibrate_sampled
    monkeypatch.setattr(insert_adc, "calibrate_sampled", lambda *a: used.append(1) or real(*a))
    for m in ("percentile:99", "mse", "entropy"):
        kw = dict(scheme="bit-serial+differential", weight_bits=4, input_bits=3, adc_bits=3, calib_inputs=x,
                  adc_range="calibrated", adc_calib=m, array_rows=20)
        fast = compile_model(src, **kw)
        assert used and insert_adc.sample_step(fast.pim.layers["second_conv"]) == 4
        with monkeypatch.context() as mp:
            mp.setattr(insert_adc, "calibrate_sampled", insert_adc.calibrate_ranges)
            full = compile_model(src, **kw)
        for a, b in zip(fast.mapping["layers"], full.mapping["layers"]):
            assert a["adc"]["step"] == b["adc"]["step"] and a["adc"]["zero_point"] == b["adc"]["zero_point"], m
        assert fast.mapping["layers"][1]["adc"]["calibration"] == m
