"""A frozen plan (compile_model(plan=...), --plan): given scales, steps and zero points are
used as given, at any bit width, never recomputed."""
import json

import numpy as np
import onnx
import pytest

import pimc
from pimc.cli import main
from pimc.core.frozen import FrozenLayer, FrozenPlan
from pimc.core.mapping import read_mapping
from pimc.demo import embedded_files
from pimc.runtime.session import open_session

SCHEMES = ("native", "differential", "bit-serial", "bit-serial+differential")


@pytest.fixture(scope="module")
def digits():
    model, data = embedded_files()
    d = np.load(data)
    return model, d["x_calib"], d["x_test"][:200]


def _run(model, x):
    s = open_session(model)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_recompiling_with_a_compiled_models_plan_reproduces_it_without_calibration_data(digits, scheme):
    model, calib, x = digits
    kw = dict(scheme=scheme, weight_bits=4, input_bits=4, adc_bits=5, cell_bits=2 if scheme != "native" else 0)
    first = pimc.compile_model(model, calib_inputs=calib, **kw)
    # no calibration data at all (synthetic inputs): every value comes from the plan
    again = pimc.compile_model(model, plan=first.model, **kw)
    assert np.array_equal(_run(first.model, x), _run(again.model, x))
    a, b = read_mapping(first.model), read_mapping(again.model)
    for La, Lb in zip(a.layers, b.layers):
        assert La.adc.step == Lb.adc.step and La.adc.zero_point == Lb.adc.zero_point
        assert La.weight_quant.scales == Lb.weight_quant.scales and La.input_quant.scale == Lb.input_quant.scale
        assert Lb.adc.range == "frozen" and Lb.input_quant.source == "frozen"
    assert any("frozen plan" in n for n in b.notes)


def test_a_complete_plan_needs_no_calibration_warning(digits, tmp_path, capsys):
    model, calib, _ = digits
    first = pimc.compile_model(model, scheme="differential", calib_inputs=calib)
    onnx.save(first.model, tmp_path / "first.pim.onnx")
    capsys.readouterr()
    assert main(["compile", str(model), "--plan", str(tmp_path / "first.pim.onnx"), "-o", str(tmp_path / "b.onnx")]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err, cap.err
    assert "ADC 6 bits (frozen)" in cap.out, cap.out
    assert any("frozen plan" in n for n in read_mapping(onnx.load(tmp_path / "b.onnx")).notes)


def test_given_values_are_kept_at_another_bit_width(digits, tmp_path):
    model, calib, _ = digits
    first = pimc.compile_model(model, scheme="differential", adc_bits=6, calib_inputs=calib)
    plan = FrozenPlan.from_mapping(read_mapping(first.model))
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert FrozenPlan.from_json(path).to_record() == plan.to_record()
    low = pimc.compile_model(model, scheme="differential", adc_bits=3, calib_inputs=calib, plan=path)
    for L6, L3 in zip(read_mapping(first.model).layers, read_mapping(low.model).layers):
        assert L3.adc.bits == 3 and L3.adc.step == L6.adc.step and L3.adc.zero_point == L6.adc.zero_point
    # without the plan the 3-bit steps are recomputed: larger
    free = read_mapping(pimc.compile_model(model, scheme="differential", adc_bits=3, calib_inputs=calib).model)
    assert free.layers[0].adc.step != read_mapping(low.model).layers[0].adc.step


def test_a_partial_plan_fixes_only_what_it_gives(digits):
    model, calib, _ = digits
    base = read_mapping(pimc.compile_model(model, scheme="differential", calib_inputs=calib).model)
    L0 = base.layers[0]
    given = (np.asarray(L0.weight_quant.scales, np.float32) * 2).astype(np.float32)
    plan = FrozenPlan({L0.name: FrozenLayer(weight_scales=given, input_scale=0.5)})
    m = read_mapping(pimc.compile_model(model, scheme="differential", calib_inputs=calib, plan=plan).model)
    assert m.layers[0].weight_quant.scales == [float(v) for v in given]
    assert m.layers[0].input_quant.scale == 0.5 and m.layers[0].input_quant.signed == L0.input_quant.signed
    assert m.layers[0].input_quant.source == "frozen" and m.layers[0].adc.range == "calibrated"
    assert m.layers[1].weight_quant.scales == base.layers[1].weight_quant.scales


def _compile(tmp_path, model_path, plan, capsys, *extra):
    out = tmp_path / "out.pim.onnx"
    rc = main(["compile", str(model_path), "--plan", str(plan), "-o", str(out), "-q", *extra])
    return rc, capsys.readouterr().err.strip(), out


@pytest.mark.parametrize("rec, needle", [
    ({"layers": {"nope": {"input_scale": 1.0}}}, "are not crossbar layers of"),
    ({"layers": {"L0": {"adc_step": [1.0, 2.0], "adc_zero_point": [0, 0]}}}, "adc_step has 2 values"),
    ({"layers": {"L0": {"weight_scales": [1.0]}}}, "weight_scales has 1 values"),
    ({"layers": {"L0": {"adc_step": [1.0]}}}, "give adc_step and adc_zero_point together"),
    ({"layers": {"L0": {"input_scale": -1}}}, "input_scale must be a positive number"),
    ({"layers": {"L0": {"scale": 1}}}, "unknown field(s) scale"),
    ({"layer": {}}, "expected {\"layers\""),
])
def test_bad_plans_are_one_line_errors(digits, tmp_path, capsys, rec, needle):
    model, calib, _ = digits
    name = read_mapping(pimc.compile_model(model, scheme="differential", calib_inputs=calib).model).layers[0].name
    rec = json.loads(json.dumps(rec).replace('"L0"', json.dumps(name)))
    (tmp_path / "plan.json").write_text(json.dumps(rec))
    np.save(tmp_path / "c.npy", calib)
    rc, err, out = _compile(tmp_path, model, tmp_path / "plan.json", capsys, "--calib-data", str(tmp_path / "c.npy"))
    assert rc == 2 and err.startswith("pimc: error: --plan") and needle in err and "\n" not in err, err
    assert not out.exists()


def test_plan_file_errors(digits, tmp_path, capsys):
    model, _, _ = digits
    rc, err, out = _compile(tmp_path, model, tmp_path / "missing.json", capsys)
    assert rc == 2 and "not found" in err and not out.exists()
    (tmp_path / "bad.json").write_text("{")
    rc, err, out = _compile(tmp_path, model, tmp_path / "bad.json", capsys)
    assert rc == 2 and "is not a JSON plan" in err
    (tmp_path / "p.txt").write_text("{}")
    rc, err, out = _compile(tmp_path, model, tmp_path / "p.txt", capsys)
    assert rc == 2 and "neither a JSON plan" in err
    onnx.save(onnx.load(model), tmp_path / "plain.onnx")
    rc, err, out = _compile(tmp_path, model, tmp_path / "plain.onnx", capsys)
    assert rc == 2 and "not a pimc PIM IR" in err and "\n" not in err
