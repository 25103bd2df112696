"""Per-layer figures, BN calibration, sweep, compare, HTML and the Ray executor."""
import json
import pickle

import numpy as np
import onnx
import pytest

from pimc.cli import main
from pimc.core.config import build_config
from pimc.core.errors import PimcError
from pimc.evaluate import evaluate
from pimc.core.chip import build_chip_config
from pimc.core.mapping import read_mapping
from test_evaluate import PREP, digits, strip_timing  # noqa: F401  (digits is a fixture)

DIGIT_ARGS = ["--scale", "0.0625", "--limit", "60", "--calib-samples", "64"]


def test_conversions_counted_from_tensors_match_the_mapping_and_lossless_layers_are_exact(digits):
    model, data = digits
    cfg = build_config(scheme="bit-serial", cell_bits=1, adc_bits=8, adc_range="full", calib_samples=64)   # lossless ADC
    r = evaluate(model, data, cfg, prep=PREP, limit=40, stats_images=16)
    assert r["results"]["ideal_pim"]["correct_top1"] == r["results"]["digital"]["correct_top1"]
    from pimc.pipeline import compile_model
    import tempfile, os
    mapping = None
    with tempfile.TemporaryDirectory() as tmp:
        x = np.load(data)["x_train"][:64].astype(np.float32)[:, None, :, :, 0] / 16
        np.save(os.path.join(tmp, "c.npy"), x)
        mapping = compile_model(model, cfg.replace(calib_data=os.path.join(tmp, "c.npy"))).mapping
    planned = {L["name"]: L.get("conversions_per_inference") for L in mapping["layers"]}
    for row in r["layers"]:
        assert row["ideal_pim"]["exact"] and row["ideal_pim"]["clip_rate"] == 0.0
        assert row["conversions_per_inference"] == planned[row["layer"]]


def test_bn_calibration_cli_writes_a_recalibrated_model(digits, tmp_path, capsys):
    model, data = digits
    pim = tmp_path / "m.pim.onnx"
    assert main(["compile", model, "-o", str(pim), "--scheme", "differential", "--weight-bits", "4", "--input-bits",
                 "4", "--adc-bits", "5", "--fold-bn", "output", "-q"]) == 0
    out = tmp_path / "cal.pim.onnx"
    assert main(["calibrate-bn", str(pim), "--data", data, "--scale", "0.0625", "--images", "64",
                 "--chip-preset", "pimqat-chip7", "--chip-seed", "3", "-o", str(out)]) == 0
    assert "recalibrated 3 BatchNorms on 64 images" in capsys.readouterr().out
    m = onnx.load(out)
    meta = {p.key: p.value for p in m.metadata_props}
    rec = json.loads(meta["pimc.bn_calibration"])
    assert rec["chip"]["chip_seed"] == 3 and rec["images"] == 64 and len(rec["layers"]) == 3
    old, new = read_mapping(onnx.load(pim)), read_mapping(m)
    assert any(a.bn_stats["mean"] != b.bn_stats["mean"] for a, b in zip(old.layers, new.layers)
               if a.bn_stats is not None)
    # a model whose BN was folded into the weights has nothing to recalibrate; the output is never written
    folded = tmp_path / "w.pim.onnx"
    assert main(["compile", model, "-o", str(folded), "-q", "--scheme", "differential"]) == 0
    capsys.readouterr()
    bad = tmp_path / "never.onnx"
    assert main(["calibrate-bn", str(folded), "--data", data, "--scale", "0.0625", "-o", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fold-bn output" in err[0] and not bad.exists()


def test_eval_with_bn_calibration_reports_before_and_after(digits):
    model, data = digits
    cfg = build_config(scheme="differential", weight_bits=4, input_bits=4, adc_bits=5, calib_samples=64,
                       fold_bn="output")
    r = evaluate(model, data, cfg, chip=build_chip_config(preset="pimqat-chip7"), chips=2, calibrate_bn=True,
                 prep=PREP, limit=200, stats_images=8)
    before, after = r["results"]["nonideal_pim"], r["results"]["nonideal_pim_bn_calibrated"]
    assert [c["chip_seed"] for c in after["chips"]] == [0, 1]
    assert after["top1"]["mean"] >= before["top1"]["mean"]
    assert len(r["bn_calibration"]["chips"]) == 2 and r["bn_calibration"]["split"] == "train"
    with pytest.raises(PimcError, match="--fold-bn output"):
        evaluate(model, data, cfg.replace(fold_bn="weights"), chips=1, calibrate_bn=True, prep=PREP, limit=10)


@pytest.mark.shared
def test_bn_calibration_does_not_lower_accuracy_on_resnet20_under_chip7(shared_dir, tmp_path):
    pytest.importorskip("torch", reason="the torch extra exports the checkpoint")
    import sys
    sys.path.insert(0, str(shared_dir.parent / "main" / "examples"))
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from resnet20_cifar import export_onnx, load_resnet20
    from pimc.datasets import CIFAR_NORMALISATION
    model = tmp_path / "r20.onnx"
    export_onnx(load_resnet20(str(shared_dir / "data/models/resnet20_cifar10.th")), str(model))
    cfg = build_config(scheme="native", weight_bits=8, input_bits=8, array_rows=144, adc_bits=7, fold_bn="output",
                       calib_samples=128)
    prep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in CIFAR_NORMALISATION.items()}
    r = evaluate(str(model), str(shared_dir / "data/cifar10/test.npz"), cfg, chip=build_chip_config(preset="pimqat-chip7"),
                 chips=2, calibrate_bn=True, calib_data=str(shared_dir / "data/cifar10/train.npz"), prep=prep,
                 limit=500, stats_images=0)
    before, after = r["results"]["nonideal_pim"]["chips"], r["results"]["nonideal_pim_bn_calibrated"]["chips"]
    for b, a in zip(before, after):
        assert a["top1"] >= b["top1"], (b, a)
    assert r["results"]["nonideal_pim_bn_calibrated"]["top1"]["mean"] > 0.7


def test_sweep_compare_and_html(digits, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need the report extra (pip install 'pimc[report]')")
    model, data = digits
    sw, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["sweep", model, "--data", data, *DIGIT_ARGS, "--schemes", "native,bit-serial", "--adc-bits-list",
                 "3,6", "--grid", "weight_bits=4,8", "--stats-images", "0", "--json", str(sw), "--plot", str(plot)]) == 0
    res = json.loads(sw.read_text())
    assert len(res["points"]) == 8 and plot.read_bytes()[:4] == b"\x89PNG"
    # float is compiled once for the whole grid, digital once per weight_bits
    compiled = [k for p in res["points"] for k in p["timing_s"] if k.startswith("compile ")]
    assert compiled.count("compile float") == 1 and compiled.count("compile digital") == 2
    acc = {(p["axes"]["scheme"], p["axes"]["adc_bits"], p["axes"]["weight_bits"]): p["results"]["ideal_pim"]["top1"]
           for p in res["points"]}
    assert acc[("bit-serial", 6, 8)] > acc[("bit-serial", 3, 8)]
    capsys.readouterr()

    a, b, html = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "html"
    base = ["eval", model, "--data", data, *DIGIT_ARGS, "--scheme", "differential", "--chips", "2"]
    assert main(base + ["--adc-bits", "6", "--json", str(a), "--html", str(html)]) == 0
    assert main(base + ["--adc-bits", "3", "--json", str(b)]) == 0
    assert {p.name for p in html.iterdir()} == {"index.html", "chips.png", "sqnr.png", "histograms.png"}
    assert "Per layer" in (html / "index.html").read_text()
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    delta = 100 * (rb["results"]["ideal_pim"]["top1"] - ra["results"]["ideal_pim"]["top1"])
    line = next(l for l in out.splitlines() if l.startswith("ideal PIM"))
    assert f"{delta:+.2f}" in line
    (tmp_path / "junk.json").write_text("{not json")
    for bad, needle in [(tmp_path / "junk.json", "not a JSON file"), (tmp_path / "missing.json", "not found")]:
        assert main(["compare", str(a), str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]


def test_eval_bad_data_gives_one_line_errors(digits, tmp_path, capsys):
    model, data = digits
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    (cifar / "test_batch").write_bytes(b"\x80\x04garbage")
    for i in range(1, 6):
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}, f)
    mism = tmp_path / "mism.npz"
    np.savez(mism, x_test=np.zeros((3, 8, 8, 1), np.uint8), y_test=np.zeros(2), x_train=np.zeros((3, 8, 8, 1), np.uint8),
             y_train=np.zeros(3))
    imgs = tmp_path / "imgs" / "a"
    imgs.mkdir(parents=True)
    (imgs / "x.png").write_bytes(b"not an image")
    out = tmp_path / "r.json"
    cases = [([str(tmp_path / "nope")], "not found"), ([str(mism)], "3 images but y has shape"),
             ([str(cifar)], "test_batch"), ([str(tmp_path / "imgs")], "x.png"),
             ([data, "--calib-split", "test"], "evaluation images")]
    for argv, needle in cases:
        assert main(["eval", model, "--data", *argv, "--json", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and err[0].startswith("pimc: error:"), err
        assert not out.exists()


def test_ray_executor_gives_the_local_result(digits):
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra (pip install 'pimc[ray]')")
    import ray
    from pimc.executor import RayExecutor
    model, data = digits
    cfg = build_config(scheme="differential", weight_bits=4, input_bits=4, adc_bits=5, calib_samples=64,
                       fold_bn="output")
    kw = dict(chip=build_chip_config(adc="nonideal", noise_sigma=0.3), chips=2, calibrate_bn=True, prep=PREP,
              limit=90, stats_images=8)
    local = evaluate(model, data, cfg, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ex = RayExecutor(shards=3)
        remote = evaluate(model, data, cfg, executor=ex, **kw)
    finally:
        ray.shutdown()
    assert remote["executor"] == "ray" and local["executor"] == "local"
    assert strip_timing(remote) == strip_timing(local)


def test_preprocessing_comes_from_the_model_metadata_and_survives_compile(digits, tmp_path, capsys):
    model, data = digits
    m = onnx.load(model)
    m.metadata_props.add(key="pimc.preprocess", value=json.dumps({"scale": 0.0625, "mean": [0], "std": [1],
                                                                  "layout": "NCHW"}))
    tagged = tmp_path / "tagged.onnx"
    onnx.save(m, tagged)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data", data, "--limit", "60", "--scheme", "digital", "--calib-samples", "32", "--stats-images", "0"]
    assert main(["eval", str(tagged), *common, "--json", str(a)]) == 0
    assert main(["eval", model, *common, "--scale", "0.0625", "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["data"]["preprocess"] == rb["data"]["preprocess"] and ra["results"] == rb["results"]
    pim = tmp_path / "t.pim.onnx"
    assert main(["compile", str(tagged), "-o", str(pim), "-q"]) == 0
    assert "pimc.preprocess" in {p.key for p in onnx.load(pim).metadata_props}


def test_atomic_outputs_get_the_usual_file_permissions(tmp_path):
    import os
    from pimc.io import _umask, write_bytes_atomic
    write_bytes_atomic(b"x", tmp_path / "f.json")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
