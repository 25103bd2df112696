"""Unit tests of the individual passes and the pipeline around them."""
import json

import numpy as np
import onnx
import pytest

import pimc
from helpers import conv_model, gemm_model, run
from pimc.core.config import build_config
from pimc.core.formulas import weight_slices
from pimc.core.planning import plan_slices, plan_tiles

RNG = np.random.default_rng(7)


def _bn(c):
    return (RNG.uniform(0.5, 1.5, c), RNG.standard_normal(c), RNG.standard_normal(c), RNG.uniform(0.5, 2, c))


@pytest.mark.parametrize("mode", ["weights", "output"])
@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_preserves_outputs(mode, group):
    w = RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)
    m = conv_model(w, RNG.standard_normal(6).astype(np.float32), pad=(1, 1, 1, 1), group=group, bn=_bn(6))
    x = RNG.standard_normal((3, 4, 9, 9)).astype(np.float32)
    res = pimc.compile_model(m, scheme="float", fold_bn=mode)
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    assert res.mapping["layers"][0]["bn"] == f"folded into {mode}"
    np.testing.assert_allclose(run(res.model, x), run(m, x), rtol=1e-5, atol=1e-5)


def test_fold_bn_output_keeps_weights_unfolded_in_arrays(tmp_path):
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = conv_model(w, None, bn=_bn(4))
    x = RNG.standard_normal((4, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    kw = dict(scheme="bit-serial", cell_bits=1, adc_bits=8, adc_range="full", calib_data=str(tmp_path / "c.npy"))  # lossless
    out = pimc.compile_model(m, fold_bn="output", **kw)
    wts = pimc.compile_model(m, fold_bn="weights", **kw)
    # output folding quantizes the raw conv weights; weight folding the BN-scaled ones
    q_out = out.pim.layers["conv"].weight_quant.q
    from pimc.core.planning import quantize_columns
    np.testing.assert_array_equal(q_out, quantize_columns(w, 8)[0])
    # per-column quantization is invariant to BN's positive per-channel scale: the
    # integer weights agree, and the BN scale lives in the weight scales or the output affine
    assert not np.allclose(out.pim.layers["conv"].weight_quant.scale, wts.pim.layers["conv"].weight_quant.scale)
    # both stay close to the float model
    ref = run(m, x)
    for r in (out, wts):
        assert np.abs(run(r.model, x) - ref).max() < 0.03 * np.abs(ref).max()


def test_float_scheme_reproduces_float_model():
    w = RNG.standard_normal((5, 3, 3, 3)).astype(np.float32)
    m = conv_model(w, RNG.standard_normal(5).astype(np.float32), stride=(2, 2), pad=(1, 1, 1, 1))
    x = RNG.standard_normal((2, 3, 11, 7)).astype(np.float32)
    np.testing.assert_allclose(run(pimc.compile_model(m, scheme="float").model, x), run(m, x), rtol=1e-6, atol=1e-6)
    fc = gemm_model(RNG.standard_normal((10, 4)).astype(np.float32), RNG.standard_normal(4).astype(np.float32))
    xf = RNG.standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_allclose(run(pimc.compile_model(fc, scheme="float").model, xf), run(fc, xf), rtol=1e-6, atol=1e-6)


def test_dynamic_batch_and_spatial_sizes(tmp_path):
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    m = conv_model(w, None, pad=(1, 1, 1, 1))
    np.save(tmp_path / "c.npy", RNG.standard_normal((4, 3, 8, 8)).astype(np.float32))
    res = pimc.compile_model(m, scheme="bit-serial+differential", cell_bits=2, calib_data=str(tmp_path / "c.npy"))
    inp = res.model.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param and inp[2].dim_param and inp[3].dim_param
    for shape in [(1, 3, 8, 8), (5, 3, 13, 6)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        assert run(res.model, x).shape == (shape[0], 8, shape[2], shape[3])


def test_plan_tiles_channel_and_row_modes():
    from pimc.core.mapping import LayerPlan
    p = LayerPlan(name="l", op_type="Conv", kind="conv", x=None, y=None,
                  weight=np.zeros((4, 16, 3, 3), np.float32), bias=None)
    t = plan_tiles(p, 128, 128, "channel")
    assert (t.tiles_per_group, t.channels_per_tile, t.rows_used) == (2, 14, [126, 18])
    r = plan_tiles(p, 128, 128, "row")
    assert r.tiles_per_group == 2 and r.rows_used == [128, 16]
    assert r.mask.sum() == 16 * 9            # every weight row on exactly one tile
    # row 128 is channel 14, kernel position 2: on tile 1, not tile 0
    assert r.tile_channels[1, 0] == 14 and r.mask[1, 0].reshape(-1).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]


def test_split_helpers_recombine():
    q = np.arange(-127, 128, dtype=np.float32)
    for cell in (1, 2, 3, 8):
        parts = list(weight_slices(q, bits=8, cell_bits=cell, differential=False))
        assert np.array_equal(sum(2.0 ** (cell * j) * d for j, d in enumerate(parts)), q)
        assert all(np.all((d >= 0) & (d < 2 ** cell)) for d in parts[:-1])
    mag = np.arange(0, 128, dtype=np.float32)
    parts = list(weight_slices(mag, bits=8, cell_bits=3, differential=True))[:3]
    assert len(parts) == 3 and np.array_equal(sum(8.0 ** j * d for j, d in enumerate(parts)), mag)
    names, coef, rng, w = plan_slices(4, 1, True, np.array([[-7, 3, 0]], np.float32))
    assert names == ["pos.c0", "pos.c1", "pos.c2", "neg.c0", "neg.c1", "neg.c2"]
    assert np.array_equal((w * coef[:, None, None]).sum(0), [[-7, 3, 0]]) and rng == (0, 1)


def test_pass_contracts_and_dumps(tmp_path):
    w = RNG.standard_normal((6, 5, 3, 3)).astype(np.float32)
    m = conv_model(w, RNG.standard_normal(6).astype(np.float32), pad=(1, 1, 1, 1), bn=_bn(6))
    np.save(tmp_path / "c.npy", np.abs(RNG.standard_normal((8, 5, 6, 6))).astype(np.float32))
    res = pimc.compile_model(m, scheme="bit-serial", array_rows=18, cell_bits=2, adc_bits=6,
                             calib_data=str(tmp_path / "c.npy"), dump_dir=tmp_path / "dump", verify=True)
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["00_import_model.onnx", "01_select_crossbar_layers.onnx", "02_fold_batchnorm.onnx",
                     "03_quantize_activations.onnx", "04_quantize_weights.onnx", "05_tile_crossbars.onnx",
                     "06_split_slices.onnx", "07_insert_adc.onnx", "08_finalize_ir.onnx"]
    x = np.abs(RNG.standard_normal((2, 5, 6, 6))).astype(np.float32)
    outs = {n: run(onnx.load(tmp_path / "dump" / n), x) for n in names}
    # tiling and slicing are exact: bit-identical to the digital quantized model
    assert np.array_equal(outs[names[4]], outs[names[5]]) and np.array_equal(outs[names[5]], outs[names[6]])
    assert [v["pass"] for v in res.verification if v["exact"]] == ["tile_crossbars", "split_slices", "finalize_ir"]
    for n in names:
        onnx.checker.check_model(onnx.load(tmp_path / "dump" / n))


def test_metadata_carries_config_version_and_mapping(tmp_path):
    w = RNG.standard_normal((6, 20, 3, 3)).astype(np.float32)
    m = conv_model(w, None, pad=(1, 1, 1, 1), in_shape=["N", 20, 8, 8])
    np.save(tmp_path / "c.npy", RNG.standard_normal((4, 20, 8, 8)).astype(np.float32))
    res = pimc.compile_model(m, scheme="differential", cell_bits=2, adc_bits=5, calib_data=str(tmp_path / "c.npy"))
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert meta["pimc.version"] == pimc.__version__
    cfg = json.loads(meta["pimc.config"])
    assert cfg["scheme"] == "differential" and cfg["adc_bits"] == 5
    mp = json.loads(meta["pimc.mapping"])
    L = mp["layers"][0]
    assert L["tiling"]["tiles_per_group"] == 2 and L["tiling"]["channels_per_tile"] == 14
    assert L["slicing"]["weight_slices"] == ["pos.c0", "pos.c1", "pos.c2", "pos.c3", "neg.c0", "neg.c1", "neg.c2", "neg.c3"]
    assert L["adc"]["columns"] == 2 * 8 * 6
    assert L["conversions_per_inference"] == 2 * 8 * 6 * 64
    assert len(L["tiling"]["arrays"]) == 2 and L["tiling"]["arrays"][1]["rows"] == [0, 54]
    assert mp["calibration"]["source"] == "file"
    onnx.checker.check_model(res.model, full_check=True)
    # the IR runs in the ONNX reference evaluator too (function bodies)
    from onnx.reference import ReferenceEvaluator
    x = RNG.standard_normal((1, 20, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(res.model).run(None, {"x": x})[0], run(res.model, x), rtol=1e-5, atol=1e-4)


def test_unsupported_ops_stay_digital_and_are_listed():
    from onnx import helper, numpy_helper as nh
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Conv", ["c", "W2"], ["d"], name="dyn_conv"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8]),
                                       helper.make_tensor_value_info("W2", 1, [4, 4, 1, 1])],
                          [helper.make_tensor_value_info("y", 1, ["N", 4, 6, 6])], [nh.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = pimc.compile_model(m, scheme="float")
    dig = {d["node"]: d["reason"] for d in res.mapping["digital_ops"]}
    assert dig == {"dyn_conv": "weight 'W2' is not a constant", "relu": "not a matrix-vector op"}
    assert [L["name"] for L in res.mapping["layers"]] == ["conv"]


def test_trained_activation_scales_are_read_from_qdq():
    from onnx import helper, numpy_helper as nh
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    inits = [nh.from_array(w, "W"), nh.from_array(np.array(0.05, np.float32), "s"),
             nh.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("Conv", ["xd", "W"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", 1, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", 1, ["N", 4, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = pimc.compile_model(m, scheme="digital")
    iq = res.mapping["layers"][0]["input_quant"]
    assert iq["source"] == "model" and iq["bits"] == 8 and iq["signed"] and abs(iq["scale"] - 0.05) < 1e-9


def test_calibrated_adc_range_is_narrower_and_recorded(tmp_path):
    w = RNG.standard_normal((8, 16, 3, 3)).astype(np.float32)
    m = conv_model(w, None, pad=(1, 1, 1, 1))
    np.save(tmp_path / "c.npy", np.abs(RNG.standard_normal((8, 16, 6, 6))).astype(np.float32))
    full = pimc.compile_model(m, scheme="differential", adc_bits=5, adc_range="full", calib_data=str(tmp_path / "c.npy"))
    cal = pimc.compile_model(m, scheme="differential", adc_bits=5, adc_range="calibrated", calib_data=str(tmp_path / "c.npy"))
    a_full, a_cal = full.pim.layers["conv"].adc, cal.pim.layers["conv"].adc
    assert np.all(a_cal.step <= a_full.step) and np.any(a_cal.step < a_full.step)
    assert cal.mapping["layers"][0]["adc"]["range"] == "calibrated"
    x = np.abs(RNG.standard_normal((4, 16, 6, 6))).astype(np.float32)
    dig = run(pimc.compile_model(m, scheme="digital", calib_data=str(tmp_path / "c.npy")).model, x)
    # calibrated ranges track the digital result more closely than worst-case ranges
    assert np.abs(run(cal.model, x) - dig).mean() < np.abs(run(full.model, x) - dig).mean()


def test_adc_range_default_is_calibrated_with_real_data_else_full(tmp_path, capsys):
    w = RNG.standard_normal((8, 16, 3, 3)).astype(np.float32)
    m = conv_model(w, None, pad=(1, 1, 1, 1))
    np.save(tmp_path / "c.npy", np.abs(RNG.standard_normal((8, 16, 6, 6))).astype(np.float32))
    real = pimc.compile_model(m, scheme="differential", adc_bits=5, calib_data=str(tmp_path / "c.npy"))
    explicit = pimc.compile_model(m, scheme="differential", adc_bits=5, adc_range="calibrated",
                                  calib_data=str(tmp_path / "c.npy"))
    assert real.mapping["layers"][0]["adc"]["range"] == "calibrated" == real.pim.config.adc_range
    assert np.array_equal(real.pim.layers["conv"].adc.step, explicit.pim.layers["conv"].adc.step)
    capsys.readouterr()
    synthetic = pimc.compile_model(conv_model(w, None, pad=(1, 1, 1, 1), in_shape=["N", 16, 6, 6]),
                                   scheme="differential", adc_bits=5)
    assert synthetic.mapping["layers"][0]["adc"]["range"] == "full" == synthetic.pim.config.adc_range
    assert "ADC ranges use the full worst-case range" in capsys.readouterr().err
    # the float and digital schemes have no ADC: auto never asks them for a calibrated range
    assert pimc.compile_model(m, scheme="float", calib_data=str(tmp_path / "c.npy")).pim.config.adc_range == "full"


def test_opset_conversion_up_and_down():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)
    ref = run(conv_model(w, None, opset=17), x)
    for opset in (11, 13, 21, 23):
        res = pimc.compile_model(conv_model(w, None, opset=opset), scheme="float")
        np.testing.assert_allclose(run(res.model, x), ref, rtol=1e-6, atol=1e-6)


def test_presets_and_hw_file(tmp_path):
    cfg = build_config(preset="pimqat-native")
    assert (cfg.scheme, cfg.array_rows, cfg.adc_bits) == ("native", 9, 7)
    hw = tmp_path / "chip.toml"
    hw.write_text('[array]\nrows = 64\ncell_bits = 1\n[adc]\nbits = 5\nrange = "full"\n[mapping]\nscheme = "bit-serial"\n')
    cfg = build_config(preset="pimqat-differential", hw=hw, adc_bits=6)
    # explicit > hw > preset > default; the [array] table spells keys without the array_ prefix
    assert (cfg.scheme, cfg.array_rows, cfg.cell_bits, cfg.adc_bits, cfg.weight_bits) == ("bit-serial", 64, 1, 6, 4)


def test_compiled_model_runs_in_a_plain_onnxruntime_session(tmp_path):
    import onnxruntime as ort
    w = RNG.standard_normal((6, 10, 3, 3)).astype(np.float32)
    m = conv_model(w, RNG.standard_normal(6).astype(np.float32), pad=(1, 1, 1, 1))
    np.save(tmp_path / "c.npy", RNG.standard_normal((4, 10, 7, 7)).astype(np.float32))
    res = pimc.compile_model(m, scheme="bit-serial+differential", cell_bits=2, array_rows=40, adc_bits=5,
                             calib_data=str(tmp_path / "c.npy"))
    x = RNG.standard_normal((3, 10, 7, 7)).astype(np.float32)
    plain = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = run(res.model, x)
    np.testing.assert_allclose(plain.run(None, {"x": x})[0], ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


def test_calibration_inputs_from_memory_equal_those_from_a_file(tmp_path):
    w = RNG.standard_normal((8, 16, 3, 3)).astype(np.float32)
    m = conv_model(w, None, pad=(1, 1, 1, 1))
    calib = np.abs(RNG.standard_normal((40, 16, 6, 6))).astype(np.float32)
    np.save(tmp_path / "c.npy", calib)
    kw = dict(scheme="bit-serial", cell_bits=1, adc_bits=5, calib_samples=32)
    ref = pimc.compile_model(m, calib_data=str(tmp_path / "c.npy"), **kw)
    x = np.abs(RNG.standard_normal((3, 16, 6, 6))).astype(np.float32)
    for given in (calib, {"x": calib}, (calib[i:i + 7] for i in range(0, 40, 7))):
        res = pimc.compile_model(m, calib_inputs=given, **kw)
        assert res.mapping["calibration"] == {"source": "memory", "samples": 32}
        assert res.mapping["layers"][0]["adc"]["range"] == "calibrated"   # real data: the auto range calibrates
        assert np.array_equal(run(res.model, x), run(ref.model, x))
    with pytest.raises(pimc.PimcError, match="not both"):
        pimc.compile_model(m, calib_inputs=calib, calib_data=str(tmp_path / "c.npy"), **kw)
    with pytest.raises(pimc.PimcError, match="calib_inputs has shape"):
        pimc.compile_model(m, calib_inputs=calib[:, :3], **kw)


@pytest.mark.parametrize("tile_mode, chunk_mib", [("channel", 256), ("row", 256), ("channel", 1)])
def test_the_ir_holds_the_chunk_arrays_of_the_planning_rules(tile_mode, chunk_mib):
    """planning.chunk_arrays is what the emitter writes: every chunk's array weights and
    channel gather in the IR equal it (training gathers and convolves with the same arrays)."""
    from onnx import numpy_helper
    from pimc.core import names as N
    from pimc.core.planning import chunk_arrays, layer_chunks
    rng = np.random.default_rng(5)
    m = conv_model(rng.standard_normal((24, 6, 3, 3)).astype(np.float32), None, pad=(1, 1, 1, 1), group=2,
                   in_shape=["N", 12, 8, 8])
    res = pimc.compile_model(m, scheme="bit-serial+differential", cell_bits=2, array_rows=40, tile_mode=tile_mode,
                             chunk_mib=chunk_mib)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for p in res.pim.layers.values():
        chunks = layer_chunks(p)
        assert len(chunks) > 1 or chunk_mib > 1
        for ci, chunk in enumerate(chunks):
            sfx = N.chunk_suffix(ci, len(chunks))
            ca = chunk_arrays(p, chunk)
            assert np.array_equal(inits[N.tensor(p.name, N.ARRAY_WEIGHT, sfx)], ca.weight)
            gather = inits.get(N.tensor(p.name, "tile_channels", sfx))
            assert (gather is None and ca.gather is None) or np.array_equal(gather, ca.gather)
            assert np.array_equal(inits[N.tensor(p.name, "recombine_coef", sfx)], ca.coef) or not ca.recombine


@pytest.mark.parametrize("scheme, expect", [("differential", 2.0), ("bit-serial+differential", 16.0), ("native", 1.0)])
def test_mac_expansion_counts_the_compiled_graphs_macs(scheme, expect):
    """16 input channels of 3x3 kernels on 128-row arrays: tiles of 14 and 2 channels (each its own
    chunk, so no padding MACs); differential doubles the columns, 8 bit planes multiply by 8."""
    from pimc.core.mapping import mac_expansion, read_mapping
    rng = np.random.default_rng(2)
    m = conv_model(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), None, pad=(1, 1, 1, 1),
                   in_shape=["N", 16, 8, 8])
    res = pimc.compile_model(m, scheme=scheme, input_bits=8)
    assert mac_expansion(read_mapping(res.model)) == expect
