"""The command line: compile end to end, and one-line errors with exit status 2."""
import json

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import conv_model
from pimc.cli import main

RNG = np.random.default_rng(3)


@pytest.fixture
def model_file(tmp_path):
    m = conv_model(RNG.standard_normal((8, 16, 3, 3)).astype(np.float32), None, pad=(1, 1, 1, 1),
                   in_shape=["N", 16, 8, 8])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    np.save(tmp_path / "calib.npy", np.abs(RNG.standard_normal((8, 16, 8, 8))).astype(np.float32))
    return p


def test_compile_prints_summary_and_writes_model(model_file, tmp_path, capsys):
    out = tmp_path / "m.pim.onnx"
    rc = main(["compile", str(model_file), "--scheme", "differential", "--adc-bits", "6", "--cell-bits", "2",
               "--calib-data", str(tmp_path / "calib.npy"), "-o", str(out), "--json", str(tmp_path / "map.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert out.is_file() and "wrote" in cap.out
    assert "conv" in cap.out and "ADC conversions per inference" in cap.out
    onnx.checker.check_model(onnx.load(out))
    assert json.loads((tmp_path / "map.json").read_text())["layers"][0]["tiling"]["tiles_per_group"] == 2


def test_default_output_path_and_synthetic_calibration_warning(model_file, capsys):
    rc = main(["compile", str(model_file), "-q"])
    cap = capsys.readouterr()
    assert rc == 0
    assert model_file.with_name("m.pim.onnx").is_file()
    assert "synthetic" in cap.err


def _bad(capsys, argv, out=None):
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap)
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pimc: error: "), cap.err
    assert "Traceback" not in cap.err
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())  # no temp leftovers
    return lines[0]


def test_missing_file(tmp_path, capsys):
    msg = _bad(capsys, ["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "nope.onnx" in msg and "not found" in msg


def test_not_onnx(tmp_path, capsys):
    p = tmp_path / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    msg = _bad(capsys, ["compile", str(p), "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "notes.onnx" in msg


def test_truncated_model(model_file, tmp_path, capsys):
    data = model_file.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    msg = _bad(capsys, ["compile", str(p), "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "trunc.onnx" in msg


@pytest.mark.parametrize("opset", [5, 99])
def test_unsupported_opset(tmp_path, capsys, opset):
    m = conv_model(RNG.standard_normal((2, 3, 1, 1)).astype(np.float32), None)
    m.opset_import[0].version = opset
    p = tmp_path / "old.onnx"
    p.write_bytes(m.SerializeToString())
    msg = _bad(capsys, ["compile", str(p), "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert f"opset {opset}" in msg


def test_channel_count_cannot_be_inferred(tmp_path, capsys):
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="mystery_conv")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", 1, ["N", "C", 8, 8]),
                                       helper.make_tensor_value_info("W", 1, ["O", "I", 3, 3])],
                          [helper.make_tensor_value_info("y", 1, ["N", "O", 6, 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "dyn.onnx"
    onnx.save(m, p)
    msg = _bad(capsys, ["compile", str(p), "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "mystery_conv" in msg and "channel" in msg


@pytest.mark.parametrize("argv,needle", [
    (["--scheme", "float", "--cell-bits", "2"], "--cell-bits"),
    (["--scheme", "differential", "--weight-bits", "4", "--cell-bits", "4"], "--cell-bits"),
    (["--array-rows", "4", "--tile-mode", "channel"], "--tile-mode row"),
    (["--adc-bits", "0"], "--adc-bits"),
    (["--calib-data", "/nonexistent/calib.npy"], "--calib-data"),
    (["--scheme", "analog"], "--scheme"),
    (["--hw", "/nonexistent/chip.toml"], "--hw"),
])
def test_bad_option_combinations(model_file, tmp_path, capsys, argv, needle):
    out = tmp_path / "o.onnx"
    msg = _bad(capsys, ["compile", str(model_file), "-o", str(out)] + argv, out)
    assert needle in msg


def test_bad_hw_file(model_file, tmp_path, capsys):
    hw = tmp_path / "chip.toml"
    hw.write_text("[array]\nrows = 'many'\n")
    assert "rows" in _bad(capsys, ["compile", str(model_file), "--hw", str(hw), "-o", str(tmp_path / "o.onnx")])
    hw.write_text("[array\nrows = 3\n")
    assert "TOML" in _bad(capsys, ["compile", str(model_file), "--hw", str(hw), "-o", str(tmp_path / "o.onnx")])


def test_calib_data_of_wrong_shape(model_file, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), np.float32))
    msg = _bad(capsys, ["compile", str(model_file), "--calib-data", str(tmp_path / "bad.npy"),
                        "-o", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "bad.npy" in msg and "shape" in msg


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("pimqat-native", "pimqat-differential", "pimqat-bit-serial", "columnquant-128"):
        assert name in out


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero "
                                                              "status code returned while running Conv node. "
                                                              "Failed to allocate memory for requested buffer of "
                                                              "size 6442450944")])
def test_out_of_memory_is_one_line(model_file, tmp_path, capsys, monkeypatch, exc):
    import pimc.pipeline

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(pimc.pipeline, "compile_model", boom)
    out = tmp_path / "o.pim.onnx"
    rc = main(["compile", str(model_file), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("pimc: error: out of memory") and "\n" not in err and "--chunk-mib" in err, err
    assert not out.exists()


def test_other_exceptions_still_raise(model_file, tmp_path, monkeypatch):
    import pimc.pipeline

    def boom(*a, **k):
        raise ValueError("a bug")
    monkeypatch.setattr(pimc.pipeline, "compile_model", boom)
    with pytest.raises(ValueError):
        main(["compile", str(model_file), "-o", str(tmp_path / "o.pim.onnx"), "-q"])
