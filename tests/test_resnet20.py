"""The real pretrained ResNet-20 on real CIFAR-10 (needs ../shared and torch)."""
import sys
from pathlib import Path

import numpy as np
import pytest

import pimc
from pimc.runtime import open_session

torch = pytest.importorskip("torch", reason="needs torch (pip install '.[torch]') to export the ResNet-20")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet20_cifar import export_onnx, load_resnet20, preprocess  # noqa: E402

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def data(shared_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("r20")
    test = np.load(shared_dir / "data/cifar10/test.npz")
    train = np.load(shared_dir / "data/cifar10/train.npz")
    np.save(d / "calib.npy", preprocess(train["x"][:512]))   # calibration: training images only
    model = load_resnet20(str(shared_dir / "data/models/resnet20_cifar10.th"))
    paths = {}
    for exporter in ("legacy", "dynamo"):
        paths[exporter] = d / f"resnet20_{exporter}.onnx"
        export_onnx(model, str(paths[exporter]), exporter)
    # torch.onnx.export(dynamo=True) without dynamic_shapes: a fixed batch of 1
    paths["dynamo_static"] = d / "resnet20_dynamo_static.onnx"
    export_onnx(model, str(paths["dynamo_static"]), "dynamo", static_batch=True)
    paths["dynamo_static_bn"] = d / "resnet20_dynamo_static_bn.onnx"      # optimize=False: BatchNorms kept
    export_onnx(model, str(paths["dynamo_static_bn"]), "dynamo", static_batch=True, optimize=False)
    return {"x": preprocess(test["x"]), "y": test["y"].astype(np.int64), "calib": str(d / "calib.npy"), "models": paths,
            "checkpoint": shared_dir / "data/models/resnet20_cifar10.th"}


def correct(model, x, y, bs=500):
    sess = open_session(model)
    name = sess.get_inputs()[0].name
    return sum(int((sess.run(None, {name: x[i:i + bs]})[0].argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_no_pim_reproduces_float_accuracy(data, exporter):
    res = pimc.compile_model(str(data["models"][exporter]), scheme="float")
    assert len(res.mapping["layers"]) == 20   # 19 convs + the linear layer
    assert correct(res.model, data["x"], data["y"]) == 9173


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_digital_w8a8_within_half_a_point(data, exporter):
    res = pimc.compile_model(str(data["models"][exporter]), scheme="digital", weight_bits=8, input_bits=8,
                             calib_data=data["calib"])
    assert res.mapping["calibration"]["source"] == "file"
    n = correct(res.model, data["x"], data["y"])
    print(f"digital W8A8 ({exporter}): {n} / 10000")
    assert abs(n - 9173) <= 50


def test_lossless_pim_equals_digital_exactly(data):
    kw = dict(weight_bits=8, input_bits=8, calib_data=data["calib"])
    dig = pimc.compile_model(str(data["models"]["legacy"]), scheme="digital", **kw)
    pim = pimc.compile_model(str(data["models"]["legacy"]), scheme="bit-serial", cell_bits=1, array_rows=128,
                             adc_bits=8, adc_range="full", **kw)
    for L in pim.mapping["layers"]:
        assert L["adc"]["lossless_columns"] == L["adc"]["columns"], L["name"]
    x = data["x"][:128]
    a = open_session(pim.model).run(None, {"input": x})[0]
    b = open_session(dig.model).run(None, {"input": x})[0]
    assert np.array_equal(a, b)


def test_static_batch_dynamo_export_compiles_and_matches(data, capsys):
    """The dynamo exporter's output with a batch fixed at 1 compiles; its IR runs at any batch (batches of 250
    here).  The default export (optimize=True) gives IRs bit-identical to those of the dynamic-batch export and
    the legacy export's top-1 as float and digital models; with optimize=False (BatchNorms kept for pimc to
    fold, as in the legacy export) the quantized IRs equal the legacy export's bit for bit, PIM included."""
    import onnx
    for name in ("dynamo_static", "dynamo_static_bn"):
        assert onnx.load(str(data["models"][name])).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x, y = data["x"][:1000], data["y"][:1000]
    top1 = {}
    for scheme in ("float", "digital", "differential"):
        kw = {} if scheme == "float" else dict(calib_data=data["calib"])
        outs = {}
        for name in ("dynamo_static", "dynamo_static_bn", "dynamo", "legacy"):
            res = pimc.compile_model(str(data["models"][name]), scheme=scheme, **kw)
            assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, (name, "batch not symbolic")
            sess = open_session(res.model)
            outs[name] = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 250]})[0]
                                         for i in range(0, len(x), 250)])
        assert np.array_equal(outs["dynamo_static"], outs["dynamo"]), scheme
        if scheme == "float":   # the exporters pool differently (ReduceMean vs GlobalAveragePool): float rounding
            assert np.allclose(outs["dynamo_static_bn"], outs["legacy"], rtol=1e-5, atol=1e-4)
        else:                   # the quantized input of the classifier absorbs it
            assert np.array_equal(outs["dynamo_static_bn"], outs["legacy"]), scheme
        top1[scheme] = {k: int((v.argmax(1) == y).sum()) for k, v in outs.items()}
    print(top1)
    assert "fixed batch of 1; made it symbolic" in capsys.readouterr().err
    assert top1["float"]["dynamo_static"] == top1["float"]["legacy"]
    assert top1["digital"]["dynamo_static"] == top1["digital"]["legacy"]
    assert all(top1[s]["dynamo_static_bn"] == top1[s]["legacy"] for s in top1)
    # the dynamo exporter folds BatchNorm into the weights itself, in float32: weights 1 ulp apart from the
    # legacy export's float64 fold flip a few borderline ADC codes at 6 bits
    assert abs(top1["differential"]["dynamo_static"] - top1["differential"]["legacy"]) <= 5


def test_the_mapping_names_the_state_dict_entries_of_every_layer(data):
    """Training matches a layer to the user's module by these names: both exporters use the state_dict keys
    (the dynamo exporter with optimize=False; with optimize=True it fuses BatchNorm and invents a bias)."""
    from pimc.core.mapping import read_mapping
    keys = set(load_resnet20(str(data["checkpoint"])).state_dict())
    for exporter in ("legacy", "dynamo_static_bn"):
        res = pimc.compile_model(str(data["models"][exporter]), scheme="native", fold_bn="output",
                                 calib_data=data["calib"])
        for L in read_mapping(res.model).layers:
            names = L.source_initializers
            assert names["weight"] in keys, (exporter, L.name, names)
            # (the dynamo exporter gives bias-free Convs a zero bias of its own, e.g. 'val_5')
            assert {v for k, v in names.items() if k != "bias"} <= keys, (exporter, L.name, names)
            if L.op_type == "Gemm":
                assert names["bias"] == "linear.bias"
            if L.op_type == "Conv":
                prefix = names["weight"][: -len("weight")]
                bn = prefix.replace("conv", "bn")
                assert names["bn_scale"] == bn + "weight" and names["bn_var"] == bn + "running_var"
