"""A new user's path: static-batch exports, output paths, compiled models given again,
preprocessing options, help texts, run outputs, progress, presets, native API, plots."""
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper as nh

import pimc
from helpers import conv_model
from pimc.cli import main
from pimc.demo import embedded_files
from pimc.runtime.session import fixed_batch, open_session, run_batches

RNG = np.random.default_rng(7)


def _bad(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap)
    lines = [ln for ln in cap.err.splitlines() if ln.strip() and not ln.startswith("pimc: note")]
    assert len(lines) == 1 and lines[0].startswith("pimc: error: "), cap.err
    assert "Traceback" not in cap.err and "None" not in lines[0]
    return lines[0]


def _plain(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# ---- static batch ------------------------------------------------------------------

def _flatten_model(batch: int, allowzero: int):
    """Conv -> Reshape to (batch, -1) as the dynamo exporter writes it -> Gemm, all at a fixed batch."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = RNG.standard_normal((4 * 6 * 6, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat", allowzero=allowzero),
             helper.make_node("MatMul", ["f", "FC"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 5])],
                          [nh.from_array(w, "W"), nh.from_array(fc, "FC"),
                           nh.from_array(np.array([batch, -1], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _batch_dependent_model():
    """Conv at batch 1, then a Reshape that folds the batch into the rows of a MatMul: only batch 1 runs."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = RNG.standard_normal((36, 2)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "s1"], ["rows"], name="rows"),          # (4, 36): batch baked in
             helper.make_node("MatMul", ["rows", "FC"], ["m"], name="fc"),
             helper.make_node("Reshape", ["m", "s2"], ["y"], name="out")]              # (1, 8)
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
                          [nh.from_array(w, "W"), nh.from_array(fc, "FC"),
                           nh.from_array(np.array([4, 36], np.int64), "s1"), nh.from_array(np.array([1, 8], np.int64), "s2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("batch,allowzero", [(1, 1), (1, 0), (4, 1)])
def test_static_batch_becomes_symbolic_and_runs_at_any_batch(tmp_path, capsys, batch, allowzero):
    m = _flatten_model(batch, allowzero)
    src = tmp_path / "static.onnx"
    onnx.save(m, src)
    np.save(tmp_path / "calib.npy", RNG.standard_normal((37, 3, 6, 6)).astype(np.float32))
    out = tmp_path / "static.pim.onnx"
    rc = main(["compile", str(src), "--calib-data", str(tmp_path / "calib.npy"), "-o", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"fixed batch of {batch}; made it symbolic" in cap.err and "Traceback" not in cap.err
    ir = onnx.load(out)
    assert fixed_batch(ir) is None
    assert ir.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = RNG.standard_normal((7, 3, 6, 6)).astype(np.float32)
    y = open_session(ir).run(None, {"x": x})[0]
    assert y.shape == (7, 5)
    # the compiled model gives every sample what it gives that sample alone
    for k in (0, 6):
        assert np.array_equal(y[k:k + 1], open_session(ir).run(None, {"x": x[k:k + 1]})[0])
    # and the float compile equals the original model, batch by batch at its own batch size
    flt = pimc.compile_model(m, scheme="float").model
    ref = np.concatenate([_plain(m, x[i:i + batch]) for i in range(0, 7 - 7 % batch, batch)])
    assert np.allclose(open_session(flt).run(None, {"x": x[:len(ref)]})[0], ref, rtol=1e-5, atol=1e-5)


def test_batch_dependent_graph_keeps_its_batch_everywhere(tmp_path, capsys):
    m = _batch_dependent_model()
    src = tmp_path / "dep.onnx"
    onnx.save(m, src)
    out = tmp_path / "dep.pim.onnx"
    rc = main(["compile", str(src), "-o", str(out), "-q"])      # synthetic calibration: 64 inputs, batches of 1
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    notes = [ln for ln in cap.err.splitlines() if "fixed batch" in ln]
    assert len(notes) == 1 and "'rows' fails at batch 2" in notes[0] and "batches of exactly 1" in notes[0]
    assert fixed_batch(onnx.load(out)) == 1
    x = RNG.standard_normal((5, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    y = np.load(tmp_path / "y.npy")
    ir = onnx.load(out)
    assert np.array_equal(y, np.concatenate([open_session(ir).run(None, {"x": x[k:k + 1]})[0] for k in range(5)]))
    # float compile == the original model, sample by sample
    flt = pimc.compile_model(m, scheme="float").model
    got = np.concatenate([o for _, _, (o,) in run_batches(open_session(flt), None, {"x": x}, 256)])
    assert np.allclose(got, np.concatenate([_plain(m, x[k:k + 1]) for k in range(5)]), rtol=1e-5, atol=1e-5)


def test_run_batches_pads_a_fixed_batch_and_trims_the_padding():
    # y = 2x through a Reshape to (6,): batch 2 baked in
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Add", ["f", "f"], ["g"]),
             helper.make_node("Reshape", ["g", "s2"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                          [nh.from_array(np.array([6], np.int64), "s"), nh.from_array(np.array([2, 3], np.int64), "s2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    sess = open_session(m)
    assert fixed_batch(sess) == 2 == fixed_batch(m)
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    parts = list(run_batches(sess, None, {"x": x}, 256))
    assert [(i, n) for i, n, _ in parts] == [(0, 2), (2, 2), (4, 1)]
    assert np.array_equal(np.concatenate([o for _, _, (o,) in parts]), 2 * x)


# ---- output paths, compiled models, options ------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model, data = embedded_files()
    d = np.load(data)
    to_u8 = lambda a: np.round(a[:, 0, :, :, None] * 16).astype(np.uint8)
    root = tmp_path_factory.mktemp("digits")
    p = root / "digits.npz"
    np.savez(p, x_test=to_u8(d["x_test"]), y_test=d["y_test"], x_train=to_u8(d["x_calib"]),
             y_train=np.zeros(len(d["x_calib"]), np.int64))
    np.savez(root / "test_only.npz", x=to_u8(d["x_test"]), y=d["y_test"])
    np.savez(root / "train_only.npz", x=to_u8(d["x_calib"]), y=np.zeros(len(d["x_calib"]), np.int64))
    return str(model), str(p), root


EVAL = ["--scheme", "differential", "--weight-bits", "4", "--input-bits", "4", "--limit", "40", "--scale", "0.0625",
        "--stats-images", "8"]


@pytest.mark.parametrize("option,kind", [("--json", "file"), ("--html", "dir")])
def test_eval_output_paths_are_checked_before_any_work(digits, tmp_path, capsys, option, kind, monkeypatch):
    model, data, _ = digits
    import pimc.evaluate
    monkeypatch.setattr(pimc.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking outputs"))
    target = tmp_path / "missing" / ("r.json" if kind == "file" else "report")
    msg = _bad(capsys, ["eval", model, "--data", data, option, str(target), *EVAL])
    assert msg.startswith(f"pimc: error: {option}:") and "does not exist" in msg and "another -o " not in msg


def test_sweep_and_compile_output_paths_are_checked_first(digits, tmp_path, capsys):
    model, data, _ = digits
    msg = _bad(capsys, ["sweep", model, "--data", data, "--plot", str(tmp_path / "nope" / "s.png"),
                        "--adc-bits-list", "4", "--schemes", "differential", "--limit", "10", "--scale", "0.0625"])
    assert "--plot" in msg
    msg = _bad(capsys, ["sweep", model, "--data", data, "--plot", str(tmp_path / "s.txt"), "--limit", "10"])
    assert "--plot" in msg and ".png" in msg
    msg = _bad(capsys, ["compile", model, "-o", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "no" / "m.json")])
    assert "--json" in msg and not (tmp_path / "m.onnx").exists()
    msg = _bad(capsys, ["compile", model, "-o", str(tmp_path / "no" / "m.onnx")])
    assert msg.startswith("pimc: error: -o:")


def test_a_compiled_model_is_refused_by_compile_eval_and_sweep(digits, tmp_path, capsys):
    model, data, _ = digits
    ir = tmp_path / "d.pim.onnx"
    assert main(["compile", model, "-o", str(ir), "-q"]) == 0
    capsys.readouterr()
    for argv in (["compile", str(ir), "-o", str(tmp_path / "again.onnx")],
                 ["eval", str(ir), "--data", data, "--limit", "10"],
                 ["sweep", str(ir), "--data", data, "--limit", "10"]):
        msg = _bad(capsys, argv)
        assert "already a pimc PIM IR" in msg and "source ONNX model" in msg and model in msg, msg
    assert not (tmp_path / "again.onnx").exists()


def test_mean_and_std_are_checked_against_the_channels(digits, capsys):
    model, data, _ = digits
    msg = _bad(capsys, ["eval", model, "--data", data, "--mean", "0.5,0.5", "--limit", "10"])
    assert "--mean: 2 values for images with 1 channels" in msg
    msg = _bad(capsys, ["eval", model, "--data", data, "--std", "0.2,0.3,0.4", "--limit", "10"])
    assert "--std: 3 values" in msg
    msg = _bad(capsys, ["eval", model, "--data", data, "--mean", "abc", "--limit", "10"])
    assert "--mean: 'abc' is not a comma list of numbers" in msg
    msg = _bad(capsys, ["eval", model, "--data", data, "--std", "0", "--limit", "10"])
    assert "--std" in msg and "zero" in msg


def test_calibration_advice_works_on_an_npz_without_splits(digits, capsys):
    model, _, root = digits
    msg = _bad(capsys, ["eval", model, "--data", str(root / "test_only.npz"), "--limit", "10"])
    assert "--calib-from TRAIN.npz" in msg and "--calib-split" not in msg
    # the advice, followed, works
    rc = main(["eval", model, "--data", str(root / "test_only.npz"), "--calib-from", str(root / "train_only.npz"),
               *EVAL])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "ideal PIM" in cap.out


def test_help_offers_only_usable_options(capsys):
    for cmd, has in (("eval", False), ("sweep", False), ("compile", True)):
        with pytest.raises(SystemExit):
            from pimc.cli import cli
            cli.main([cmd, "--help"], prog_name="pimc")
        offered = re.search(r"^\s*--calib-data\b", capsys.readouterr().out, re.M) is not None
        assert offered == has, cmd


def test_run_output_suffix(digits, tmp_path, capsys):
    model, _, _ = digits
    x = np.load(embedded_files()[1])["x_test"][:4]
    np.save(tmp_path / "x.npy", x)
    msg = _bad(capsys, ["run", model, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.txt")])
    assert "-o" in msg and ".npy or .npz" in msg and not (tmp_path / "out.txt").exists()
    assert main(["run", model, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.npz")]) == 0
    assert np.load(tmp_path / "out.npz")[onnx.load(model).graph.output[0].name].shape[0] == 4


def test_layer_statistics_show_progress(digits, capsys):
    model, data, _ = digits
    rc = main(["eval", model, "--data", data, *EVAL[:-1], "32", "--chips", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "layer statistics (2 models): 16/64 images" in cap.err


def test_presets_list_chip_presets_too(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "pimqat-differential" in out and "pimqat-chip7" in out and "--gain-sigma 0.024" in out


def test_native_states_the_api_versions(capsys):
    from pimc.runtime import native
    header, runtime = native.api_versions()
    if header is None:
        pytest.skip("no onnxruntime headers here (pimc native --fetch-headers)")
    assert 1 <= header <= runtime
    assert main(["native"]) == 0
    out = capsys.readouterr().out
    assert f"C API version {header}" in out and "supported" in out and f"1..{runtime}" in out


def _external(tmp_path, location):
    sub = tmp_path / "sub"
    sub.mkdir(exist_ok=True)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
                          [nh.from_array(np.ones((4, 4), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(m, sub / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    m2 = onnx.load(sub / "m.onnx", load_external_data=False)
    for e in m2.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    onnx.save(m2, sub / "bad.onnx")
    return sub / "bad.onnx"


@pytest.mark.parametrize("location,needle", [("../../x.bin", "points outside"), ("missing.bin", "missing.bin")])
def test_external_data_errors_are_one_line(tmp_path, capsys, location, needle):
    bad = _external(tmp_path, location)
    for argv in (["compile", str(bad), "-o", str(tmp_path / "o.onnx")],
                 ["run", str(bad), "--input", str(tmp_path / "x.npy")]):
        np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
        msg = _bad(capsys, argv)
        assert "external data" in msg and needle in msg
    assert not (tmp_path / "o.onnx").exists()


# ---- plots --------------------------------------------------------------------------

def test_plots_ticks_legends_and_labels():
    pytest.importorskip("matplotlib")
    from pimc.htmlreport import figure_chips, figure_histograms, figure_sweep
    res = {"float": {"top1": 0.9}, "digital": {"top1": 0.88}, "ideal_pim": {"top1": 0.85},
           "nonideal_pim": {"top1": {"mean": 0.5}, "chips": [{"top1": 0.2 + 0.08 * i, "chip_seed": i} for i in range(10)]}}
    fig = figure_chips({"results": res})
    ax = fig.axes[0]
    fig.canvas.draw()
    leg = ax.get_legend().get_window_extent()
    assert leg.y1 <= ax.get_window_extent().y0, "the legend must sit outside the axes"
    pts = [{"axes": {"scheme": s, "adc_bits": b}, "results": {"float": {"top1": 0.9}, "ideal_pim": {"top1": 0.1 * b}}}
           for s in ("native", "differential") for b in (3, 4, 5, 6, 7, 8)]
    fig = figure_sweep({"axes": {"scheme": ["native", "differential"], "adc_bits": [3, 4, 5, 6, 7, 8]},
                        "points": pts, "data": {"images": 10}})
    ticks = fig.axes[0].get_xticks()
    assert list(ticks) == [3, 4, 5, 6, 7, 8]
    layers = [{"layer": f"l{i}", "a": {"code_hist": [1, 5, 3, 0]}, "b": {"code_hist": [2, 2, 2, 2]}} for i in range(6)]
    fig = figure_histograms({"layers": layers})
    used = [a for a in fig.axes if a.has_data()]
    assert all(a.get_xlabel() == "ADC output code" for a in used[-4:])
    assert len(fig.legends) == 1 and all(a.get_legend() is None for a in used)
    assert all(t.get_fontsize() >= 8 for a in used for t in a.get_xticklabels())
