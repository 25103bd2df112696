"""`pimc eval` on the embedded digits CNN: report schema, determinism, calibration split, errors."""
import json

import numpy as np
import pytest

from pimc.cli import main
from pimc.core.config import build_config
from pimc.demo import embedded_files
from pimc.core.errors import PimcError
from pimc.evaluate import evaluate
from pimc.core.chip import build_chip_config
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model, data = embedded_files()
    d = np.load(data)
    to_u8 = lambda a: np.round(a[:, 0, :, :, None] * 16).astype(np.uint8)   # (N, 8, 8, 1), 0..16
    p = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(p, x_test=to_u8(d["x_test"]), y_test=d["y_test"], x_train=to_u8(d["x_calib"]),
             y_train=np.zeros(len(d["x_calib"]), np.int64))
    return str(model), str(p)


PREP = {"scale": 1 / 16, "mean": [0.0], "std": [1.0], "layout": "NCHW"}


def _eval(digits, **kw):
    model, data = digits
    cfg = build_config(scheme="differential", weight_bits=4, input_bits=4, adc_bits=5, calib_samples=64)
    return evaluate(model, data, cfg, chip=build_chip_config(adc="nonideal", noise_sigma=0.3), chips=2,
                    prep=PREP, limit=120, **kw)


def test_report_schema_and_figures(digits):
    r = _eval(digits)
    assert set(r) >= {"versions", "compile_config", "data", "calibration", "results", "chip_config", "layers",
                      "stats_images", "timing_s", "executor"}
    assert set(r["results"]) == {"float", "digital", "ideal_pim", "nonideal_pim"}
    for row in r["layers"]:
        assert set(row) >= {"layer", "adc_bits", "conversions_per_inference", "ideal_pim", "nonideal_pim (chip 0)"}
        for v in ("ideal_pim", "nonideal_pim (chip 0)"):
            assert set(row[v]) == {"sqnr_db", "exact", "clip_rate", "code_hist"}
            assert len(row[v]["code_hist"]) == 2 ** row["adc_bits"] and 0 <= row[v]["clip_rate"] <= 1
    # the chip's non-idealities cost SQNR in the last layer
    last = r["layers"][-1]
    assert last["nonideal_pim (chip 0)"]["sqnr_db"] < last["ideal_pim"]["sqnr_db"]
    assert r["results"]["float"]["top1"] > 0.95 and r["results"]["float"]["images"] == 120
    chips = r["results"]["nonideal_pim"]["chips"]
    assert [c["chip_seed"] for c in chips] == [0, 1]
    assert r["results"]["nonideal_pim"]["top1"]["min"] <= r["results"]["nonideal_pim"]["top1"]["mean"]
    assert r["calibration"]["split"] == "train" and r["data"]["split"] == "test"
    json.dumps(r)


def strip_timing(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k not in ("timing_s", "executor")}, sort_keys=True)


def test_every_figure_is_deterministic(digits):
    assert strip_timing(_eval(digits)) == strip_timing(_eval(digits))


def test_calibration_never_reads_evaluation_images(digits):
    model, data = digits
    with pytest.raises(PimcError, match="evaluation images"):
        evaluate(model, data, build_config(scheme="digital"), prep=PREP, calib_split="test")


def test_eval_cli_and_errors(digits, tmp_path, capsys):
    model, data = digits
    out = tmp_path / "r.json"
    assert main(["eval", model, "--data", data, "--scale", "0.0625", "--scheme", "bit-serial", "--adc-bits", "4",
                 "--limit", "50", "--chips", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["ideal_pim"]["images"] == 50
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", x_test=np.zeros((3, 8, 8, 1), np.uint8), y_test=np.zeros(2))
    for argv, needle in [(["--data", str(tmp_path / "nope")], "not found"),
                         (["--data", str(tmp_path / "bad.npz")], "3 images but y has shape")]:
        assert main(["eval", model] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
