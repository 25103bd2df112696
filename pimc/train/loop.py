"""A plain PIM-QAT training loop over in-memory images: SGD with momentum and a cosine
learning rate, optional flips and padded crops, chips resampled every K steps
(variability-aware training), resumable checkpoints (model, optimizer, RNG states, step)
written atomically, and a progress bar (tqdm) on stderr."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

from pimc.core.chip import ChipConfig
from pimc.core.errors import PimcError
from .model import QatModel, atomic_torch_save, sample_chip


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0            # passes over the (subset of the) training images; fractions allowed
    batch_size: int = 128
    lr: float = 0.01               # weights, BatchNorm and biases
    scale_lr: float = 0.001        # learned scales s_x, s_w
    adc_lr: float = 0.0            # ADC steps, relative to their starting value (relative_adc_gradients); 0: fixed (fix_adc_steps)
    momentum: float = 0.9
    weight_decay: float = 5e-5     # weights only
    augment: bool = True           # random horizontal flips and 4-pixel padded crops (images >= 16 px)
    seed: int = 0                  # data order, augmentation and chip draws
    resample_every: int = 0        # variability-aware training: a new chip every K steps (0: never)
    checkpoint_every: int = 200    # steps between checkpoints (and at the end)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _param_groups(qm: QatModel, cfg: TrainConfig) -> list[dict]:
    scales, weights, other, adc = [], [], [], []
    for name, p in qm.named_parameters():
        if name.endswith("adc_step"):
            adc.append(p)
        elif name.endswith(("input_scale", "weight_scale")):
            scales.append(p)
        elif name.endswith("inner.weight"):
            weights.append(p)
        else:
            other.append(p)
    return [dict(params=weights, lr=cfg.lr, weight_decay=cfg.weight_decay),
            dict(params=other, lr=cfg.lr, weight_decay=0.0),
            dict(params=scales, lr=cfg.scale_lr, weight_decay=0.0),
            dict(params=adc, lr=cfg.adc_lr, weight_decay=0.0)]


def fix_adc_steps(qm: QatModel, fixed: bool) -> None:
    """Whether the ADC steps take gradients: not when they are fixed (``TrainConfig.adc_lr`` 0,
    the default), which spares the LSQ step gradient's passes over every partial sum (an SGD
    group with learning rate 0 left them where they were just the same)."""
    for layer in qm.layers.values():
        p = getattr(layer, "adc_step", None)
        if p is not None:
            p.requires_grad_(not fixed)


def relative_adc_gradients(qm: QatModel) -> None:
    """Turn each ADC step's gradient into that of the step relative to its starting value,
    u = Delta / Delta_0 (times Delta_0, as an SGD step on u is one of Delta_0 * du on Delta):
    SGD with momentum on u, i.e. on Delta with the gradient times Delta_0^2.  Delta is in
    partial-sum units (tens of LSBs) and its LSQ gradient reaches it through the layer's output
    scale (s_x s_w, ~1e-2): at the learning rate of s_x and s_w a step moved Delta by ~1e-11 of
    itself, below float32's resolution, so the ADC ranges never left their calibration."""
    for layer in qm.layers.values():
        p = getattr(layer, "adc_step", None)
        if p is not None and p.grad is not None:
            p.grad.mul_(layer.adc_step_start * layer.adc_step_start)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if h < 16 or w < 16:
        return x
    p = TF.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    p = torch.gather(p, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return torch.gather(p, 3, cols)


def fit(qm: QatModel, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, state_path: str | Path | None = None,
        resume: bool = False, chip: ChipConfig | None = None, run_config: dict | None = None, log=None,
        progress: bool = True) -> dict:
    """Train ``qm`` on preprocessed images ``x`` (N, C, H, W) and labels ``y``.  ``chip``: the
    chip kind to train on (resampled every ``cfg.resample_every`` steps when > 0).
    ``state_path``: checkpoint file (resumed from with ``resume``; ``run_config`` must then
    equal the one it was written with).  Returns the history (loss per logged step) and the step a
    resumed run continued from (``resumed_from_step``, 0 for a fresh run)."""
    from tqdm import tqdm
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    opt = torch.optim.SGD(_param_groups(qm, cfg), momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    chip_rng = np.random.default_rng([cfg.seed, 1])
    step, history = 0, []
    full_config = {"train": cfg.to_dict(), "run": run_config or {}, "chip": None if chip is None else
                   json.loads(chip.to_json())}
    if resume and state_path is not None and Path(state_path).is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if json.loads(st["config"]) != json.loads(json.dumps(full_config)):
            raise PimcError(f"--resume: '{state_path}' was written by a run with another configuration; start "
                            f"afresh (drop --resume) or give the same options")
        qm.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["torch_rng"])
        chip_rng.bit_generator.state = json.loads(st["chip_rng"])
        step, history = int(st["step"]), json.loads(st["history"])
        if chip is not None and st.get("chip_seed") is not None:
            qm.set_chip(dataclasses.replace(chip, chip_seed=int(st["chip_seed"])))
        if log:
            log(f"resumed from '{state_path}' at step {step}/{total}")
    elif chip is not None:
        qm.set_chip(chip)

    def save():
        if state_path is None:
            return
        atomic_torch_save({"model": qm.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "torch_rng": gen.get_state(), "chip_rng": json.dumps(chip_rng.bit_generator.state),
                           "step": step, "history": json.dumps(history), "config": json.dumps(full_config),
                           "chip_seed": None if qm.chip is None else qm.chip.chip_seed}, state_path)

    start = step   # 0, or the step a resumed run continues from
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
    qm.train()
    bar = tqdm(total=total, initial=step, desc="pimc train", unit="step", disable=not progress, leave=False)
    order = None
    fix_adc_steps(qm, cfg.adc_lr == 0)
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            if order is None or k == 0:
                order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            if chip is not None and cfg.resample_every > 0 and step % cfg.resample_every == 0:
                sample_chip(qm, chip_rng, chip)
            idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            xb = xt[idx]
            if cfg.augment:
                xb = _augment(xb, gen)
            loss = TF.cross_entropy(qm(xb), yt[idx])
            if not torch.isfinite(loss):
                raise PimcError(f"training diverged at step {step} (loss {float(loss)}); lower --lr, --scale-lr or --adc-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            relative_adc_gradients(qm)
            opt.step()
            sched.step()
            step += 1
            history.append([step, round(loss.item(), 5)])
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][1]:.3f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                save()
    finally:
        bar.close()
        fix_adc_steps(qm, False)
    qm.eval()
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "loss": history, "resumed_from_step": start}


@torch.no_grad()
def accuracy(qm: QatModel, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 of ``qm`` in eval mode (the deployed computation) on ``x``."""
    was = qm.training
    qm.eval()
    correct = 0
    for i in range(0, len(x), batch):
        out = qm(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
        correct += int((out.argmax(1).numpy() == y[i:i + batch]).sum())
    qm.train(was)
    return correct / len(x)
