"""Train the small CNN embedded in pimc for ``pimc demo`` (scikit-learn's digits).

Usage::

    python examples/train_digits_cnn.py            # writes pimc/data/digits_cnn.onnx and pimc/data/digits.npz

The 1,797 8x8 grey images of scikit-learn's bundled digits set are split with a
fixed seed into 1,297 training and 500 test images.  Inputs are x/16 (0..1),
NCHW float32.  The CNN (3 conv + BN + ReLU, global average pool, linear) trains
for 60 epochs with Adam on the CPU in about half a minute.  The ONNX export
keeps BatchNorm separate (pimc folds it).  digits.npz holds ``x_test``,
``y_test`` (evaluation) and ``x_calib`` (256 training images, for calibration
only).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "pimc" / "data"


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(a.seed).permutation(len(x))
    test, train = perm[:500], perm[500:]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for epoch in range(a.epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    print(f"test accuracy {acc:.4f}")
    a.out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(a.out / "digits_cnn.onnx"), dynamo=False,
                      do_constant_folding=False, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    np.savez_compressed(a.out / "digits.npz", x_test=x[test], y_test=y[test].astype(np.uint8),
                        x_calib=x[train[:256]])
    print(f"wrote {a.out / 'digits_cnn.onnx'} and {a.out / 'digits.npz'}")


if __name__ == "__main__":
    main()
