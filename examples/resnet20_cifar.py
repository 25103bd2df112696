"""The CIFAR ResNet-20 of He et al. ("option A" shortcuts), its loader and ONNX export.

Usage::

    python examples/resnet20_cifar.py ../shared/data/models/resnet20_cifar10.th -o resnet20.onnx [--exporter legacy|dynamo] [--static-batch]

The state_dict keys of the public checkpoint load unchanged.  The export has a
dynamic batch axis; ``--static-batch`` writes a fixed batch of 1 instead, as
``torch.onnx.export(..., dynamo=True)`` does without ``dynamic_shapes`` (pimc
makes such a batch symbolic on import).  ``legacy`` is torch.onnx's TorchScript exporter (run with
do_constant_folding=False so that BatchNorm stays a separate node for pimc to
fold); ``dynamo`` is the default torch.export-based exporter (needs onnxscript).
Preprocessing expected by the model: x/255, per-channel mean
(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), NCHW float32.
"""
from __future__ import annotations

import argparse
import io
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    x = x_uint8_nhwc.astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class ShortcutA(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if (stride != 1 or cin != planes) else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, planes, stride if b == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def load_resnet20(path: str) -> ResNetCifar:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    model = ResNetCifar(3)
    model.load_state_dict(sd)
    return model.eval()


def export_onnx(model: nn.Module, path: str, exporter: str = "legacy", opset: int = 17, input_hw=(32, 32),
                static_batch: bool = False, optimize: bool = True) -> None:
    """``optimize`` (dynamo only): the exporter's graph optimisation, which folds each
    BatchNorm into its Conv in float32; with False the BatchNorms stay for pimc to fold
    (in float64, as for the legacy export)."""
    x = torch.zeros(1, 3, *input_hw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes=None if static_batch else {"input": {0: "batch"}, "logits": {0: "batch"}})
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            out = sys.stdout
            sys.stdout = io.StringIO()  # the dynamo exporter prints progress lines
            try:
                prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(opset, 18),
                                         input_names=["input"], output_names=["logits"],
                                         dynamic_shapes=None if static_batch else {"x": {0: batch}},
                                         optimize=optimize)
                prog.save(path)
            finally:
                sys.stdout = out
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    # the preprocessing the model expects, for `pimc eval` (metadata key pimc.preprocess)
    import json
    import onnx
    m = onnx.load(path)
    m.metadata_props.add(key="pimc.preprocess", value=json.dumps(
        {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW"}))
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    ap.add_argument("--static-batch", action="store_true", help="fixed batch of 1 (no dynamic batch axis)")
    ap.add_argument("--no-optimize", action="store_true", help="dynamo: keep the BatchNorms (optimize=False)")
    a = ap.parse_args()
    export_onnx(load_resnet20(a.checkpoint), a.output, a.exporter, static_batch=a.static_batch,
                optimize=not a.no_optimize)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
