"""``prepare``: the user's torch module with its mapped layers computing what the compiled
IR computes; ``sample_chip``; ``export``: back to the IR through the normal compiler.

Layers are matched by weight name: both torch exporters name a Conv/Gemm weight after its
``state_dict`` key (``layer1.0.conv1.weight``), and the mapping records that name
(``source_initializers``).  Each matched ``Conv2d`` / ``Linear`` is replaced in its parent
by a :class:`~pimc.train.layer.PimLayer` holding it (its parameters are the module's own),
and the BatchNorm folded into its output by a :class:`~pimc.train.layer.BnGate`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from pimc.core import names as N
from pimc.core.chip import ChipConfig
from pimc.core.config import CompileConfig, layer_configs, may_use
from pimc.core.errors import PimcError
from pimc.core.frozen import FrozenLayer, FrozenPlan
from pimc.core.mapping import read_mapping
from pimc.runtime.session import disabled_optimizers
from .memory import keep_freed_memory
from .layer import BnGate, PimLayer
from .pooling import OrtPooling


class QatModel(nn.Module):
    """The user's module prepared for PIM-QAT.  ``module``: it, with mapped layers replaced
    (their parameters and buffers are registered there, once); ``layers``: layer name ->
    PimLayer (a plain dict: no second registration); ``mapping``, ``config``: what it was
    compiled with; ``input_shape``: the model input's shape after the batch (for export)."""

    def __init__(self, module: nn.Module, layers: dict, mapping, config: CompileConfig, input_shape, swaps: list,
                 preprocess: str | None):
        super().__init__()
        self.module = module
        self.layers = dict(layers)
        self.mapping, self.config, self.input_shape = mapping, config, list(input_shape)
        self._swaps = swaps            # (parent, attribute, original module, replacement)
        self.preprocess = preprocess
        self.chip: ChipConfig | None = None
        self.session_disabled: tuple = ()   # the optimizers a pimc session on the IR disables (pooling.py)

    def forward(self, *args, **kwargs):
        if self.training:   # (the mode below costs 10-40 % of a training step in Python dispatch)
            return self.module(*args, **kwargs)
        with OrtPooling(self.session_disabled):   # eval: whole-plane average pooling in onnxruntime's order
            return self.module(*args, **kwargs)

    def layer(self, name: str) -> PimLayer:
        return self.layers[name]

    def set_chip(self, chip: ChipConfig | None) -> None:
        """Train / evaluate on chip ``chip`` (its static draws from the shared draw function), or
        on the ideal ADC (None)."""
        self.chip = chip
        for L in self.layers.values():
            L.set_chip(chip)

    @contextlib.contextmanager
    def original_modules(self):
        """The user's own module tree while inside (for export); the mapped layers afterwards."""
        for parent, attr, orig, _ in self._swaps:
            setattr(parent, attr, orig)
        try:
            yield self.module
        finally:
            for parent, attr, _, new in self._swaps:
                setattr(parent, attr, new)

    def frozen_plan(self) -> FrozenPlan:
        """The trained values of every layer, as a frozen plan at the deployed bit widths."""
        out = {}
        for name, L in self.layers.items():
            vals = dict(input_scale=float(np.float32(L.input_scale.item())), input_signed=bool(L.in_signed),
                        weight_scales=L.deployed_weight_scale(), output_rescale=L.deployed_rescale())
            if L.adc:
                vals["adc_step"], vals["adc_zero_point"] = L.deployed_adc()
            out[name] = FrozenLayer(**vals)
        return FrozenPlan(out)


def _resolve(module: nn.Module, name: str):
    """(parent module, attribute, submodule) of the parameter ``name`` (``a.b.weight``)."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    parent_path, _, attr = path.rpartition(".")
    return module.get_submodule(parent_path), attr, sub


def load_compiled(compiled) -> onnx.ModelProto:
    from pimc.io import load_onnx
    if isinstance(compiled, onnx.ModelProto):
        return compiled
    if hasattr(compiled, "model") and isinstance(compiled.model, onnx.ModelProto):   # a CompileResult
        return compiled.model
    return load_onnx(compiled)


def prepare(module: nn.Module, compiled, *, train_adc_bits: int | None = None, rescale: bool = False,
            check_weights: bool = True, source: str = "compiled model") -> QatModel:
    """``module`` prepared for PIM-QAT on the mapping of ``compiled`` (a CompileResult, a compiled
    ModelProto or its path), compiled from this module's export with ``--fold-bn output``.
    ``train_adc_bits``: train with ADCs of that many bits over the same ranges (adjusted
    precision); ``rescale``: PIM-QAT's rescaling of the converted partial sums.
    Any mismatch between the module and the mapping is a one-line PimcError."""
    keep_freed_memory()   # the step's large temporaries without fresh pages (pimc.train.memory)
    proto = load_compiled(compiled)
    mapping = read_mapping(proto, source)
    meta = {p.key: p.value for p in proto.metadata_props}
    config = CompileConfig.from_dict(json.loads(meta["pimc.config"]))
    if mapping.stage != "final":
        raise PimcError(f"'{source}' is an intermediate model (stage '{mapping.stage}'); prepare takes a final "
                        f"compiled model")
    if not may_use(config, "quantized"):
        raise PimcError(f"'{source}' was compiled with --scheme {config.scheme}: nothing is quantized to train; "
                        f"compile with a PIM scheme or --scheme digital")
    params = dict(module.named_parameters())
    layers, swaps = {}, []
    inits = {t.name: t for t in proto.graph.initializer}
    per_layer = layer_configs(config, [(L.name, (L.source_initializers or {}).get("weight")) for L in mapping.layers])
    for li, L in enumerate(mapping.layers):
        if L.weight_quant is None:
            continue   # a float layer (per-layer rule): the module's own layer, trained as it is
        if L.bn == "folded into weights":
            raise PimcError(f"'{source}': layer '{L.name}' has its BatchNorm folded into the weights; training keeps "
                            f"BN after the arrays: compile with --fold-bn output")
        wname = (L.source_initializers or {}).get("weight")
        if wname not in params:
            raise PimcError(f"'{source}': layer '{L.name}' reads weight '{wname}', which is no parameter of the "
                            f"module; pass the module the model was exported from")
        parent, attr, inner = _resolve(module, wname)
        _check_module(inner, L, wname, source)
        bn = None
        bname = (L.source_initializers or {}).get("bn_scale")
        if L.bn == "folded into output":
            if bname not in params:
                raise PimcError(f"'{source}': layer '{L.name}': its BatchNorm scale '{bname}' is no parameter of the "
                                f"module")
            bparent, battr, bn = _resolve(module, bname)
            if not isinstance(bn, nn.BatchNorm2d):
                raise PimcError(f"'{source}': layer '{L.name}': '{bname}' belongs to a {type(bn).__name__}, not a "
                                f"BatchNorm2d")
            gate = BnGate(bn)
            swaps.append((bparent, battr, bn, gate))
        layer = PimLayer(inner, L, li, per_layer[L.name][0], bn=bn, train_adc_bits=train_adc_bits, rescale=rescale)
        if check_weights:
            _check_weights(layer, L, inits, source)
        layers[L.name] = layer
        swaps.append((parent, attr, inner, layer))
    for parent, attr, _, new in swaps:
        setattr(parent, attr, new)
    shape = [d.dim_value or None for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]
    qm = QatModel(module, layers, mapping, config, shape, swaps, meta.get("pimc.preprocess"))
    qm.session_disabled = tuple(disabled_optimizers(proto))
    qm.train(module.training)
    return qm


def _check_module(inner, L, wname: str, source: str) -> None:
    where = f"'{source}': layer '{L.name}' (module '{wname.rsplit('.', 1)[0]}')"
    if isinstance(inner, nn.Conv2d):
        if inner.padding_mode != "zeros":
            raise PimcError(f"{where}: padding_mode '{inner.padding_mode}' is not supported (arrays see zero padding)")
        if isinstance(inner.padding, str):
            raise PimcError(f"{where}: padding='{inner.padding}'; give explicit integer padding")
        got = dict(kernel=list(inner.kernel_size), strides=list(inner.stride), dilations=list(inner.dilation),
                   group=inner.groups, pads=[*inner.padding, *inner.padding], cout=inner.out_channels)
        want = dict(kernel=list(L.kernel), strides=list(L.strides), dilations=list(L.dilations), group=L.group,
                    pads=list(L.pads), cout=L.cout)
        if L.kind != "conv":
            raise PimcError(f"{where}: a Conv2d, but the model maps a {L.op_type} there")
    elif isinstance(inner, nn.Linear):
        got, want = dict(cout=inner.out_features, k=inner.in_features), dict(cout=L.cout, k=L.rows_per_column)
        if L.kind != "fc":
            raise PimcError(f"{where}: a Linear, but the model maps a {L.op_type} there")
    else:
        raise PimcError(f"{where}: the weight belongs to a {type(inner).__name__}; pimc trains layers computed by "
                        f"nn.Conv2d or nn.Linear modules (not F.conv2d calls or other modules)")
    for k in want:
        if got[k] != want[k]:
            raise PimcError(f"{where}: {k} {got[k]} in the module, {want[k]} in the compiled model; pass the module "
                            f"the model was exported from")


def _check_weights(layer: PimLayer, L, inits: dict, source: str) -> None:
    """The module's weight, quantized with the mapping's scales and placed on the arrays, must be
    the IR's array weights (or its integer weights for the digital scheme)."""
    with torch.no_grad():
        from pimc.core import formulas as F
        qw = F.quantize_weight(layer.weight().detach(), layer.weight_scale.detach(), bits=layer.w_bits)
        if layer.tiled:
            pairs = [(w, N.tensor(L.name, N.ARRAY_WEIGHT, c.suffix)) for c, w in zip(layer.chunks, layer.chunk_cells(qw))]
        else:
            pairs = [(qw, N.tensor(L.name, "weight_q"))]
    for got, name in pairs:
        ref = inits.get(name)
        if ref is None:
            raise PimcError(f"'{source}': layer '{L.name}' has no initializer '{name}'; recompile with this pimc")
        ref = numpy_helper.to_array(ref)
        if ref.shape != tuple(got.shape) or not np.array_equal(ref, got.numpy()):
            n = int(np.sum(ref != got.numpy())) if ref.shape == tuple(got.shape) else -1
            raise PimcError(f"'{source}': layer '{L.name}': the module's weights do not give the compiled array weights "
                            f"({'shape differs' if n < 0 else f'{n} cells differ'}): the mapping is from another model, "
                            f"or the exporter changed the weights (the dynamo exporter fuses BatchNorm into Conv: "
                            f"export with optimize=False, or use the TorchScript exporter)")


def sample_chip(qm: QatModel, rng: np.random.Generator | int, chip: ChipConfig) -> ChipConfig:
    """Draw a new chip of ``chip``'s kind (a fresh chip seed from ``rng``) and train on it:
    the static draws come from the shared draw function (``pimc.core.chip.draw_layer``), so a
    chip sampled here with seed k is the chip ``instantiate`` makes with seed k."""
    rng = np.random.default_rng(rng)
    new = dataclasses.replace(chip, chip_seed=int(rng.integers(0, 2 ** 31 - 1)))
    qm.set_chip(new)
    return new


def export_onnx(module: nn.Module, path: str | Path, input_shape, preprocess: str | None = None,
                opset: int = 17) -> None:
    """The float model (TorchScript exporter, BatchNorms kept: ``do_constant_folding=False``),
    dynamic batch, input 'input', output 'logits'."""
    was = module.training
    module.eval()
    x = torch.zeros(1, *input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        module.train(was)
    if preprocess:
        m = onnx.load(str(path))
        m.metadata_props.add(key="pimc.preprocess", value=preprocess)
        onnx.save(m, str(path))


def compile_module(module: nn.Module, input_shape, *, config: CompileConfig | None = None, calib_inputs=None,
                   log=None, **options):
    """Export ``module`` and compile it with ``--fold-bn output`` (training keeps BN after the
    arrays): the CompileResult ``prepare`` takes."""
    from pimc.pipeline import compile_model
    if config is None:
        from pimc.core.config import build_config
        config = build_config(**{**options, "fold_bn": "output"})
    elif config.fold_bn != "output":
        config = config.replace(fold_bn="output")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        export_onnx(module, path, input_shape)
        return compile_model(str(path), config, calib_inputs=calib_inputs, log=log, source="<module export>")


def export(qm: QatModel, path: str | Path, *, float_path: str | Path | None = None, log=None):
    """Write the trained model as a PIM IR at ``path``: the module's float ONNX export (BN kept)
    compiled through the normal pipeline with its trained values as a frozen plan (the emitter
    stays the only writer of the IR).  ``float_path``: also keep the float export there.
    Returns the CompileResult."""
    from pimc.pipeline import compile_model
    plan = qm.frozen_plan()
    cfg = qm.config.replace(calib_data=None)
    with tempfile.TemporaryDirectory() as d:
        fpath = Path(float_path) if float_path else Path(d) / "trained.onnx"
        with qm.original_modules() as m:
            export_onnx(m, fpath, qm.input_shape, qm.preprocess)
        x = np.zeros((1, *qm.input_shape), np.float32)
        res = compile_model(str(fpath), cfg, plan=plan, calib_inputs={"input": x}, log=log,
                            source=str(float_path) if float_path else "<pimc.train export>")
    res.save(path)
    return res


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
