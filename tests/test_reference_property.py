"""Property tests: compiled PIM model == independent numpy reference; lossless == digital."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pimc
from helpers import conv_model, gemm_model, run
from reference import pim_conv

PIM_SCHEMES = ["native", "differential", "bit-serial", "bit-serial+differential"]


@st.composite
def conv_cases(draw):
    depthwise = draw(st.booleans()) and draw(st.booleans())
    group = draw(st.sampled_from([1, 1, 2, 3]))
    cin_g = 1 if depthwise else draw(st.integers(1, 5))
    cout_g = 1 if depthwise else draw(st.integers(1, 4))
    if depthwise:
        group = draw(st.integers(2, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 1)) for _ in range(4))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers(dil[0] * (kh - 1) + 1, 7))
    w_ = draw(st.integers(dil[1] * (kw - 1) + 1, 7))
    scheme = draw(st.sampled_from(PIM_SCHEMES))
    wb = draw(st.integers(2, 6))
    mag = wb - 1 if scheme.endswith("differential") else wb
    cfg = dict(scheme=scheme, weight_bits=wb, input_bits=draw(st.integers(1, 5)),
               cell_bits=draw(st.integers(0, mag)), tile_mode=draw(st.sampled_from(["channel", "row"])),
               adc_bits=draw(st.integers(2, 8)), adc_range=draw(st.sampled_from(["full", "calibrated"])))
    cfg["array_rows"] = draw(st.integers(kh * kw if cfg["tile_mode"] == "channel" else 1, 40))
    signed_input = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return dict(group=group, cin_g=cin_g, cout_g=cout_g, k=(kh, kw), stride=stride, pad=pad, dil=dil,
                hw=(h, w_), cfg=cfg, signed_input=signed_input, seed=seed, bias=draw(st.booleans()))


def _data(c):
    rng = np.random.default_rng(c["seed"])
    cin = c["cin_g"] * c["group"]
    w = rng.standard_normal((c["cout_g"] * c["group"], c["cin_g"], *c["k"])).astype(np.float32)
    b = rng.standard_normal(w.shape[0]).astype(np.float32) if c["bias"] else None
    x = rng.standard_normal((2, cin, *c["hw"])).astype(np.float32)
    calib = rng.standard_normal((6, cin, *c["hw"])).astype(np.float32)
    if not c["signed_input"]:
        x, calib = np.abs(x), np.abs(calib)
    return w, b, x, calib


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(conv_cases())
def test_ideal_adc_matches_reference(tmp_path, c):
    w, b, x, calib = _data(c)
    np.save(tmp_path / "calib.npy", calib)
    m = conv_model(w, b, stride=c["stride"], pad=c["pad"], dil=c["dil"], group=c["group"])
    res = pimc.compile_model(m, calib_data=str(tmp_path / "calib.npy"), act_calib="max", adc_calib="max",
                             **c["cfg"])   # the min/max calibration the reference implements
    y = run(res.model, x)
    ref = pim_conv(x, w, b, calib, stride=c["stride"], pad=c["pad"], dil=c["dil"], group=c["group"], **c["cfg"])
    assert y.shape == ref.shape
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= 1e-5, (err, c)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(conv_cases())
def test_lossless_adc_equals_digital_exactly(tmp_path, c):
    w, b, x, calib = _data(c)
    np.save(tmp_path / "calib.npy", calib)
    m = conv_model(w, b, stride=c["stride"], pad=c["pad"], dil=c["dil"], group=c["group"])
    cfg = dict(c["cfg"], adc_bits=16, adc_range="full")   # enough levels for every partial sum of these sizes
    pim = pimc.compile_model(m, calib_data=str(tmp_path / "calib.npy"), **cfg)
    dig = pimc.compile_model(m, calib_data=str(tmp_path / "calib.npy"), scheme="digital",
                             weight_bits=cfg["weight_bits"], input_bits=cfg["input_bits"])
    for L in pim.mapping["layers"]:
        assert L["adc"]["lossless_columns"] == L["adc"]["columns"]
    assert np.array_equal(run(pim.model, x), run(dig.model, x))


@pytest.mark.parametrize("scheme", PIM_SCHEMES)
@pytest.mark.parametrize("kind", ["gemm", "gemm_transb", "matmul"])
@pytest.mark.parametrize("adc_range", ["full", "calibrated"])
def test_fc_layers_match_reference(tmp_path, scheme, kind, adc_range):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32) if kind != "matmul" else None
    x = np.abs(rng.standard_normal((5, 37))).astype(np.float32)
    calib = np.abs(rng.standard_normal((8, 37))).astype(np.float32)
    np.save(tmp_path / "c.npy", calib)
    m = gemm_model(w, b, matmul=kind == "matmul", trans_b=kind == "gemm_transb")
    cfg = dict(scheme=scheme, weight_bits=4, input_bits=4, cell_bits=2 if scheme != "native" else 0,
               array_rows=16, adc_bits=5, adc_range=adc_range)
    res = pimc.compile_model(m, calib_data=str(tmp_path / "c.npy"), act_calib="max", adc_calib="max", **cfg)
    y = run(res.model, x)
    ref = pim_conv(x[:, :, None, None], w.T[:, :, None, None], b, calib[:, :, None, None], **cfg)[:, :, 0, 0]
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
