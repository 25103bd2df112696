"""The retraining hook (pimc.train): the torch forward built from the compiled mapping equals
the deployed IR bit for bit, its gradients are the STE/LSQ ones, export recompiles the trained
values through the normal compiler, and bad inputs are one-line errors."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch", reason="pimc.train needs the torch extra")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import pimc.train as T  # noqa: E402
from pimc.core import formulas as F  # noqa: E402
from pimc.core.chip import ChipConfig  # noqa: E402
from pimc.core.errors import PimcError  # noqa: E402
from pimc.core.mapping import read_mapping  # noqa: E402
from pimc.runtime.session import open_session  # noqa: E402
from pimc.train.autograd import BitPlanes, WeightSlices  # noqa: E402

PIM_SCHEMES = ["native", "differential", "bit-serial", "bit-serial+differential"]


class Net(nn.Module):
    """Conv-BN-ReLU (no bias), strided Conv-BN with bias and asymmetric-free padding, a grouped
    1x1 Conv without BN, a pooled Linear."""

    def __init__(self, cin=3, width=8, classes=5, groups=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 1, groups=groups)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = TF.relu(self.bn1(self.conv1(x)))
        x = TF.relu(self.bn2(self.conv2(x)))
        x = TF.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    net = Net(**kw)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def data(n=16, seed=1, hw=8):
    return np.random.default_rng(seed).standard_normal((n, 3, hw, hw)).astype(np.float32)


def compiled(net, **opts):
    return T.compile_module(net, [3, 8, 8], calib_inputs={"input": data(32, seed=7)}, **opts)


def ort(model, x, chip=None, native=None):
    sess = open_session(model, chip, chip_seed=chip.chip_seed if chip is not None else None, native=native)
    return sess.run(None, {"input": x})[0]


def torch_eval(qm, x):
    qm.eval()
    with torch.no_grad():
        return qm(torch.from_numpy(x)).numpy()


CHIP = ChipConfig(adc="nonideal", chip_seed=3, gain_sigma=0.03, offset_sigma=0.6, noise_sigma=0.5, inl=0.5)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=st.sampled_from(PIM_SCHEMES + ["digital"]), wb=st.integers(2, 5), ib=st.integers(1, 5),
       cell=st.integers(0, 2), mode=st.sampled_from(["channel", "row"]), rows=st.integers(9, 40),
       adc_bits=st.integers(2, 7), chip=st.sampled_from(["ideal", "chip", "device"]), native=st.booleans())
def test_torch_forward_equals_deployed_ir(scheme, wb, ib, cell, mode, rows, adc_bits, chip, native):
    """Parity 1: torch eval == onnxruntime (function bodies and native kernels) on the compiled
    IR, max |diff| 0, ideal ADC and a chip with gain, offset, INL curve, noise and device variation."""
    mag = wb - 1 if scheme.endswith("differential") else wb
    cell = 0 if scheme == "digital" else min(cell, mag)
    net = make_net()
    res = compiled(net, scheme=scheme, weight_bits=wb, input_bits=ib, cell_bits=cell, tile_mode=mode,
                   array_rows=rows, adc_bits=adc_bits)
    qm = T.prepare(net, res)
    cfg = None
    if chip != "ideal" and scheme != "digital":
        cfg = CHIP if chip == "chip" else dataclasses.replace(CHIP, device_sigma_cell=0.05, device_sigma_chip=0.02,
                                                              noise_sigma=0.0)
    qm.set_chip(cfg)
    x = data()
    got = torch_eval(qm, x)
    want = ort(res.model, x, cfg, native=None if native else False)
    if cfg is not None and cfg.device_sigma_cell > 0:
        # non-integer cells: the partial sums are float sums whose order the conv engines choose
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    else:
        assert np.array_equal(got, want), float(np.abs(got - want).max())


def test_train_then_export_recompiles_to_the_same_outputs(tmp_path):
    """Training moves weights, scales, ADC steps, BN and the rescaling factor; the export
    recompiles them through the normal pipeline and the IR computes the trained model bit for bit;
    its mapping equals the training mapping except for the learned values."""
    net = make_net()
    res = compiled(net, scheme="bit-serial+differential", weight_bits=4, input_bits=4, cell_bits=2, array_rows=40,
                   adc_bits=2, adc_range="calibrated")
    qm = T.prepare(net, res, rescale=True).train()
    before = {k: v.detach().clone() for k, v in qm.named_parameters()}
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    x, y = torch.from_numpy(data(32, seed=3)), torch.arange(32) % 5
    for _ in range(3):
        loss = TF.cross_entropy(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [k for k, v in qm.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.endswith("adc_step") for k in moved) and any(k.endswith("input_scale") for k in moved)
    assert any(k.endswith("weight_scale") for k in moved) and any(k.endswith("inner.weight") for k in moved)
    assert all(float(L.rho) != 1.0 for L in qm.layers.values())
    xt = data(24, seed=9)
    got = torch_eval(qm, xt)
    out = T.export(qm, tmp_path / "trained.pim.onnx", float_path=tmp_path / "trained.onnx")
    assert (tmp_path / "trained.pim.onnx").is_file() and (tmp_path / "trained.onnx").is_file()
    assert np.array_equal(got, ort(out.model, xt))
    a, b = read_mapping(res.model), read_mapping(out.model)
    learned = {"input_quant", "weight_quant", "adc", "bn_stats", "output_rescale"}
    for La, Lb in zip(a.layers, b.layers):
        ra, rb = La.to_record(), Lb.to_record()
        assert {k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)} <= learned
        assert Lb.adc.range == "frozen" and Lb.input_quant.source == "frozen"
        assert ra["tiling"] == rb["tiling"] and ra["chunks"] == rb["chunks"]


def test_adc_steps_learn_relative_to_their_compiled_values(tmp_path):
    """fit moves the ADC steps as SGD on step/step0 (gradient times step0^2): with adc_lr 0 they
    stay the compiled ones bit for bit; with adc_lr > 0 they move, and the deployed IR still
    computes the trained model."""
    from pimc.train.loop import TrainConfig, relative_adc_gradients, fit
    net = make_net()
    res = compiled(net, scheme="differential", weight_bits=4, input_bits=4, array_rows=40, adc_bits=3,
                   adc_range="calibrated")
    x, y = data(64, seed=3), (np.arange(64) % 5).astype(np.int64)
    qm = T.prepare(net, res, rescale=True).train()
    TF.cross_entropy(qm(torch.from_numpy(x[:16])), torch.from_numpy(y[:16])).backward()
    raw = {k: L.adc_step.grad.clone() for k, L in qm.layers.items()}
    relative_adc_gradients(qm)
    for k, L in qm.layers.items():
        assert torch.equal(L.adc_step.grad, raw[k] * (L.adc_step_start * L.adc_step_start))
    steps = {}
    for adc_lr in (0.0, 50.0):
        qm = T.prepare(make_net(), res, rescale=True)
        fit(qm, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.01, adc_lr=adc_lr, augment=False), progress=False)
        steps[adc_lr] = {k: L.adc_step.detach().clone() for k, L in qm.layers.items()}
        start = {k: L.adc_step_start for k, L in qm.layers.items()}
    assert all(torch.equal(steps[0.0][k], start[k]) for k in start)
    assert any(not torch.equal(steps[50.0][k], start[k]) for k in start)
    assert all(L.adc_step.requires_grad for L in qm.layers.values())   # fit leaves them trainable again
    # fixed steps take no gradient (fit at adc_lr 0), and the rest of the step's gradients are the same
    qm2 = T.prepare(make_net(), res, rescale=True).train()
    T.fix_adc_steps(qm2, True)
    qm3 = T.prepare(make_net(), res, rescale=True).train()
    for m in (qm2, qm3):
        TF.cross_entropy(m(torch.from_numpy(x[:16])), torch.from_numpy(y[:16])).backward()
    assert all(L.adc_step.grad is None for L in qm2.layers.values())
    for (n2, p2), (n3, p3) in zip(qm2.named_parameters(), qm3.named_parameters()):
        assert n2 == n3 and (p2.grad is None if n2.endswith("adc_step") else torch.equal(p2.grad, p3.grad)), n2
    xt = data(24, seed=9)
    got = torch_eval(qm, xt)
    assert np.array_equal(got, ort(T.export(qm, tmp_path / "t.pim.onnx").model, xt))


def test_chip_sampled_in_training_is_the_instantiated_chip():
    net = make_net()
    res = compiled(net, scheme="differential", weight_bits=4, input_bits=4, array_rows=18, adc_bits=5)
    qm = T.prepare(net, res)
    chip = T.sample_chip(qm, 11, CHIP)
    assert chip.chip_seed == T.sample_chip(qm, 11, CHIP).chip_seed
    x = data()
    assert np.array_equal(torch_eval(qm, x), ort(res.model, x, chip))


def test_adjusted_precision_keeps_the_range_and_deploys_fewer_bits(tmp_path):
    net = make_net()
    res = compiled(net, scheme="differential", weight_bits=4, input_bits=4, array_rows=18, adc_bits=3,
                   adc_range="calibrated")
    qm = T.prepare(net, res, train_adc_bits=5)
    L = qm.layer(read_mapping(res.model).layers[1].name)
    assert L.adc_bits == 5 and L.deploy_adc_bits == 3
    step, zp = L.deployed_adc()
    M = read_mapping(res.model).layers[1].adc
    # untrained: the deployed steps are the compiled ones up to the float32 rounding of the round trip,
    # except on columns whose range is under 31 LSB: their 5-bit step stays 1 (Delta >= 1), a wider range
    fine = L.adc_step.detach().numpy() > 1
    assert fine.sum() > 64
    np.testing.assert_allclose(step[fine], np.asarray(M.step, np.float32)[fine], rtol=1e-6)
    assert np.array_equal(zp[fine], np.asarray(M.zero_point, np.float32)[fine])
    out = T.export(qm, tmp_path / "t.pim.onnx")
    assert read_mapping(out.model).layers[1].adc.bits == 3


def test_ste_shares_sum_to_identity():
    q = torch.tensor([-7.0, -1.0, 0.0, 3.0, 7.0], requires_grad=True)
    coef = torch.tensor([1.0, 2.0, 4.0, -1.0, -2.0, -4.0])
    s = WeightSlices.apply(q, coef, 4, 1, True)
    assert torch.equal((s * coef[:, None]).sum(0), q.detach())
    (s * coef[:, None]).sum().backward()
    assert torch.allclose(q.grad, torch.ones(5))
    x = torch.tensor([[-3.0, 5.0, -8.0, 7.0]], requires_grad=True)
    p = BitPlanes.apply(x, 4, 1)
    w = torch.tensor([1.0, 2.0, 4.0, -8.0])
    (p.reshape(4, 1, 4) * w.reshape(4, 1, 1)).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


@settings(max_examples=25, deadline=None)
@given(planes=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2]), tiles=st.integers(1, 3),
       slices=st.integers(1, 3), cout=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_recombine_gradient_equals_autograds_through_the_formula(planes, groups, tiles, slices, cout, seed):
    """Recombine's float32 backward gives the gradient autograd derives through formulas.recombine's
    float64 contraction, bit for bit (coefficients of any float32 value, not only powers of two)."""
    from pimc.core import formulas as F
    from pimc.train.autograd import Recombine
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(planes * 3, groups * tiles * slices * cout, 2, 3, generator=g)
    coef = torch.randn(planes, slices, generator=g)
    coef[0, 0] = 1.0
    up = torch.randn(3, groups * cout, 2, 3, generator=g)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    y1 = Recombine.apply(a1, coef, planes, groups, tiles, slices)
    y2 = F.recombine(a2, coef, planes=planes, groups=groups, tiles=tiles, slices=slices)
    assert torch.equal(y1, y2)
    (y1 * up).sum().backward()
    (y2 * up).sum().backward()
    assert torch.equal(a1.grad, a2.grad)


def test_lsq_input_gradient():
    from pimc.train.autograd import QuantizeInput
    x = torch.tensor([0.3, 1.26, 9.0, -1.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = QuantizeInput.apply(x, s, 3, 0) * s           # unsigned 3 bits: levels 0..7
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    want = (round(0.6) - 0.6) + (round(2.52) - 2.52) + 7 + 0
    assert abs(float(s.grad) - want) < 1e-5


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_adc_gradients_are_ste_and_lsq(bits, seed, step_grad):
    """Adc's backward: the partial sums' gradient passes inside the code range and is 0 outside;
    the step's (when it takes one) is sum(grad * (round(v) - v)) inside and sum(grad * (clipped - z))
    outside, per column: the spelling with masks as 0/1 factors gives these values exactly."""
    from pimc.train.autograd import Adc
    rng = np.random.default_rng(seed)
    s = torch.from_numpy(np.round(rng.standard_normal((3, 5, 4, 4)) * 40).astype(np.float32)).requires_grad_()
    step = torch.from_numpy(rng.uniform(1, 9, (1, 5, 1, 1)).astype(np.float32)).requires_grad_(step_grad)
    zp = torch.from_numpy(np.round(rng.uniform(0, 2 ** bits - 1, (1, 5, 1, 1))).astype(np.float32))
    up = torch.from_numpy(rng.standard_normal(s.shape).astype(np.float32))
    (Adc.apply(s, step, zp, bits, None) * up).sum().backward()
    _, v, r, code, clipped = F.adc_quantize_parts(s.detach(), step.detach(), zp, bits=bits)
    inside = code == clipped
    assert torch.equal(s.grad, torch.where(inside, up, torch.zeros_like(up)))
    if step_grad:
        want = (up * torch.where(inside, r - v, clipped - zp)).sum(dim=(0, 2, 3), keepdim=True)
        assert torch.equal(step.grad, want)
    else:
        assert step.grad is None


def _err(fn, *parts):
    with pytest.raises(PimcError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_bad_inputs_are_one_line_errors():
    net = make_net()
    res = compiled(net, scheme="differential", weight_bits=4, input_bits=4, array_rows=18, adc_bits=5)
    other = make_net(seed=5)
    _err(lambda: T.prepare(other, res), "conv1", "cells differ")
    wider = make_net(width=12)
    _err(lambda: T.prepare(wider, res), "cout")

    class Renamed(Net):
        pass
    r = Renamed()
    r.first = r.conv1
    del r.conv1
    _err(lambda: T.prepare(r, res), "conv1.weight", "no parameter")
    from pimc.pipeline import compile_model
    with_w = compile_model(_export(make_net()), scheme="differential", fold_bn="weights",
                           calib_inputs={"input": data(8)})
    _err(lambda: T.prepare(make_net(), with_w), "--fold-bn output")
    flt = compile_model(_export(make_net()), scheme="float", fold_bn="output")
    _err(lambda: T.prepare(make_net(), flt), "--scheme float")

    class Reflect(Net):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False, padding_mode="reflect")
    _err(lambda: T.prepare(Reflect(), res), "padding_mode")

    class Functional(nn.Module):   # a layer computed by F.conv2d: its weight is no Conv2d's
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(w)

        def forward(self, x):
            return TF.conv2d(x, self.weight, padding=1)
    f = make_net()
    f.conv1 = Functional(f.conv1.weight.detach().clone())
    _err(lambda: T.prepare(f, res), "nn.Conv2d or nn.Linear")


def _export(net):
    import tempfile
    d = tempfile.mkdtemp()
    T.export_onnx(net, f"{d}/m.onnx", [3, 8, 8])
    return f"{d}/m.onnx"


# ---------------------------------------------------------------- pimc train (CLI)
NET_FILE = '''
import torch.nn as nn
import torch.nn.functional as TF


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(TF.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))


def net():
    return Net()


def conv_fn():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(8, 3, 3, 3))
    import torch
    return F()
'''


@pytest.fixture
def train_setup(tmp_path):
    import importlib.util
    (tmp_path / "net.py").write_text(NET_FILE)
    spec = importlib.util.spec_from_file_location("net_for_test", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.net().state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=rng.integers(0, 5, 300), x_test=xte,
             y_test=rng.integers(0, 5, 40))
    return tmp_path


def _train_args(t, *extra):
    return ["train", "--module", f"{t}/net.py:net", "--checkpoint", str(t / "w.pt"), "--data", str(t / "d.npz"),
            "--scheme", "differential", "--weight-bits", "4", "--input-bits", "4", "--adc-bits", "3",
            "--array-rows", "18", "--batch-size", "32", "--calib-images", "64", "-o", str(t / "o.pim.onnx"), *extra]


def test_cli_train_writes_ir_report_and_resumes(train_setup, capsys):
    from pimc.cli import main
    t = train_setup
    rc = main(_train_args(t, "--epochs", "0.5", "--json", str(t / "r.json")))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "after PIM-QAT" in cap.out and (t / "o.pim.onnx").is_file() and (t / "o.pim.onnx.state.pt").is_file()
    import json
    rep = json.loads((t / "r.json").read_text())
    assert rep["steps"] == 4 and set(rep["top1"]) == {"direct", "trained"}
    first = (t / "o.pim.onnx").read_bytes()
    # resuming a finished run trains no further step and writes the same model
    assert main(_train_args(t, "--epochs", "0.5", "--resume")) == 0
    assert "resumed" in capsys.readouterr().err and (t / "o.pim.onnx").read_bytes() == first
    rc = main(_train_args(t, "--epochs", "1", "--resume"))
    assert rc == 2 and "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (("--module", "nofile.py:net"), "--module: file"),
    (("--module", "{t}/net.py:nothing"), "has no function 'nothing'"),
    (("--module", "{t}/net.py:conv_fn"), "does not fit the module"),
    (("--checkpoint", "{t}/d.npz"), "--checkpoint"),
    (("--fold-bn", "weights"), "--fold-bn output"),
    (("--scheme", "float"), "nothing is quantized"),
    (("--epochs", "0"), "--epochs"),
    (("--variability", "nochip"), "--variability"),
])
def test_cli_train_bad_inputs(train_setup, capsys, change, message):
    from pimc.cli import main
    t = train_setup
    args = _train_args(t, "--epochs", "0.2")
    opt, val = change
    val = val.format(t=t)
    if opt in args:
        args[args.index(opt) + 1] = val
    else:
        args += [opt, val]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (t / "o.pim.onnx").exists()


def test_cli_train_refuses_test_images_in_training(train_setup, capsys):
    from pimc.cli import main
    t = train_setup
    z = np.load(t / "d.npz")
    xtr = z["x_train"].copy()
    xtr[5] = z["x_test"][3]
    np.savez(t / "d.npz", x_train=xtr, y_train=z["y_train"], x_test=z["x_test"], y_test=z["y_test"])
    assert main(_train_args(t, "--epochs", "0.2")) == 2
    assert "1 of the test images also appear" in capsys.readouterr().err


def test_per_layer_rules_train_and_deploy_alike():
    """Per-layer rules (first layer digital, one layer native among differential ones, histogram
    calibration): torch eval == the deployed IR bit for bit.  A float layer (the classifier) is
    the module's own: equal up to float rounding (torch's Linear and onnxruntime's 1x1 Conv sum
    in different orders)."""
    import pimc.core.config as C
    x = data()
    for float_last in (False, True):
        net = make_net()   # prepare swaps the module's layers in place
        rules = ({"match": ["conv2*"], "scheme": "native", "adc_bits": 5},)
        rules += ({"match": ["last"], "scheme": "float"},) if float_last else ()
        res = compiled(net, scheme="differential", weight_bits=4, input_bits=4, adc_bits=4, array_rows=18,
                       digital_layers="first", layer_overrides=rules, act_calib="mse", adc_calib="mse")
        schemes = [L["scheme"] for L in res.mapping["layers"]]
        assert schemes[0] == "digital" and "native" in schemes and "differential" in schemes
        assert (schemes[-1] == "float") == float_last
        qm = T.prepare(net, res)
        assert len(qm.layers) == len(schemes) - float_last
        for cfg in (None, CHIP):
            qm.set_chip(cfg)
            got, want = torch_eval(qm, x), ort(res.model, x, cfg)
            if float_last:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(got, want), cfg
        assert C.layer_rules(res.pim.config)[-1]["where"] == "--digital-layers first"


def _ort_pool(node, x, disabled):
    import onnxruntime
    from onnx import TensorProto, helper
    g = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled)).run(None, {"x": x})[0]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), c=st.sampled_from([1, 3, 8, 12, 16, 24, 32, 64]), h=st.integers(1, 12),
       w=st.integers(1, 12), seed=st.integers(0, 2 ** 16), blocked=st.booleans())
def test_whole_plane_pooling_sums_in_onnxruntimes_order(n, c, h, w, seed, blocked):
    """In QatModel.forward, adaptive_avg_pool2d(x, 1) and avg_pool2d over the whole plane give
    onnxruntime's GlobalAveragePool / AveragePool bit for bit, with the blocked-layout transformer
    on (the order then depends on the channel count) and off (pimc sessions on PIM models); torch's
    own kernels differ by an ulp on about two thirds of the outputs."""
    from onnx import helper
    from pimc.train.pooling import OrtPooling, onnxruntime_order
    disabled = () if blocked else ("NchwcTransformer",)
    assert onnxruntime_order(disabled, c, h, w) in ("sequential", "lanes4")
    x = np.random.default_rng(seed).lognormal(0, 2, (n, c, h, w)).astype(np.float32)
    gap = _ort_pool(helper.make_node("GlobalAveragePool", ["x"], ["y"]), x, disabled)
    ap = _ort_pool(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[h, w]), x, disabled)
    t = torch.from_numpy(x)
    with OrtPooling(disabled):
        got = [TF.adaptive_avg_pool2d(t, 1), TF.avg_pool2d(t, (h, w)), nn.AdaptiveAvgPool2d((1, 1))(t)]
        assert TF.avg_pool2d(t, 1).shape == t.shape        # a smaller window: torch's own
    for g in got:
        assert np.array_equal(g.numpy(), gap) and np.array_equal(g.numpy(), ap)


def test_qat_model_pools_in_onnxruntimes_order():
    """A module pooling with adaptive_avg_pool2d: torch eval == the IR (GlobalAveragePool) bit for bit."""
    class Pooled(Net):
        def forward(self, x):
            x = TF.relu(self.bn1(self.conv1(x)))
            x = TF.relu(self.bn2(self.conv2(x)))
            x = TF.relu(self.conv3(x))
            return self.fc(TF.adaptive_avg_pool2d(x, 1).flatten(1))
    x = data(64)
    for scheme in ("differential", "digital"):
        torch.manual_seed(0)
        net = Pooled().eval()          # prepare swaps the module's layers: a fresh one each time
        res = compiled(net, scheme=scheme, weight_bits=4, input_bits=4, adc_bits=5)
        assert "GlobalAveragePool" in {n.op_type for n in res.model.graph.node}
        qm = T.prepare(net, res)
        assert np.array_equal(torch_eval(qm, x), ort(res.model, x))


@pytest.mark.parametrize("scheme", ["differential", "bit-serial"])
def test_sub_batches_give_the_batch_values(scheme, monkeypatch):
    """A layer whose partial sums exceed PimLayer.sub_batch_elements runs in sub-batches: the same
    outputs (training and eval, ideal and noisy chip) and the same gradients up to summation order."""
    from pimc.train.layer import PimLayer
    net = make_net()
    res = compiled(net, scheme=scheme, weight_bits=4, input_bits=4, adc_bits=4, array_rows=20)
    qm = T.prepare(net, res, rescale=True)
    x = torch.from_numpy(data(12))
    y = torch.arange(12) % 5
    state = {k: v.clone() for k, v in qm.state_dict().items()}   # a training forward moves BN and rho

    def run(chip):
        qm.load_state_dict(state)
        qm.set_chip(chip)
        qm.train()
        qm.zero_grad()
        loss = TF.cross_entropy(qm(x), y)
        loss.backward()
        grads = [p.grad.clone() for p in qm.parameters() if p.grad is not None]
        qm.eval()
        with torch.no_grad():
            return loss.item(), grads, qm(x)
    for chip in (None, CHIP):
        whole = run(chip)
        monkeypatch.setattr(PimLayer, "sub_batch_elements", 64)      # one image or a few per sub-batch
        parts = run(chip)
        monkeypatch.undo()
        assert whole[0] == parts[0] and torch.equal(whole[2], parts[2])
        for a, b in zip(whole[1], parts[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_keep_freed_memory_is_set_once_and_can_be_declined():
    import os
    import platform
    import subprocess
    import sys
    code = "from pimc.train.memory import keep_freed_memory as k; print(k(), k())"
    want = "True True" if platform.libc_ver()[0] == "glibc" else None   # other C libraries: left as they are
    for env, expect in (({}, want), ({"PIMC_KEEP_FREED_MEMORY": "0"}, "False False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.strip()
        assert expect is None or out == expect, (env, out)
