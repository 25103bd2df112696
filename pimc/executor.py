"""Where evaluation work runs: this machine, or a Ray cluster.

Work is a list of *jobs*: (compiled model, chip or None, images).  Chips and
data shards are independent, and the noise of a conversion never depends on
the other images of its batch, so a job may be split into shards anywhere
without changing one figure: counts of correct answers are summed per job.

* ``LocalExecutor`` runs jobs one after another in this process; each
  onnxruntime session uses all local cores (intra-op threads; ``threads``
  limits them).
* ``RayExecutor`` (``pip install 'pimc[ray]'``) sends each job's shards, and
  per-chip BN calibrations, as Ray tasks: the model and images are put into the
  object store once, every task opens its own session with one thread.
  ``address`` None starts (or joins) a local Ray instance.
"""
from __future__ import annotations

import time

import numpy as np

from .core.errors import PimcError


def topk(logits: np.ndarray, y: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int(np.sum(np.any(top == y[:, None], axis=1)))


def count_correct(model: bytes, chip, x: np.ndarray, y: np.ndarray, batch: int, threads: int = 0,
                  progress=None) -> dict:
    """Top-1 / top-5 correct counts of ``model`` on chip ``chip`` over (x, y)."""
    from pimc.runtime.session import open_session, run_batches
    sess = open_session(model, chip, threads=threads)
    name = sess.get_inputs()[0].name
    c1 = c5 = 0
    for i, rows, (out, *_) in run_batches(sess, None, {name: x}, batch):
        c1 += topk(out, y[i:i + rows], 1)
        c5 += topk(out, y[i:i + rows], 5)
        if progress is not None:
            progress(rows)
    return {"correct_top1": c1, "correct_top5": c5, "images": int(len(x))}


def _count_shard(model: bytes, chip, x, y, lo: int, hi: int, batch: int) -> dict:
    return count_correct(model, chip, x[lo:hi], y[lo:hi], batch, threads=1)


def _bn_calibrate(model: bytes, chip, xc: np.ndarray, batch: int) -> tuple[bytes, dict]:
    import onnx
    from .bncal import calibrate_bn
    m, rec = calibrate_bn(onnx.load_from_string(model), chip, xc, batch=batch)
    return m.SerializeToString(), rec


class LocalExecutor:
    name = "local"

    def __init__(self, threads: int = 0, progress_factory=None):
        self.threads = threads
        self.progress_factory = progress_factory

    def run(self, jobs: list[tuple], x: np.ndarray, y: np.ndarray, batch: int) -> list[dict]:
        out = []
        for label, model, chip in jobs:
            bar = self.progress_factory(len(x), label) if self.progress_factory else None
            t0 = time.perf_counter()
            r = count_correct(model, chip, x, y, batch, self.threads, bar.update if bar else None)
            if bar:
                bar.close()
            r["seconds"] = time.perf_counter() - t0
            out.append(r)
        return out

    def calibrate(self, model: bytes, chips: list, xc: np.ndarray, batch: int) -> list[tuple[bytes, dict]]:
        return [_bn_calibrate(model, c, xc, batch) for c in chips]


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, shards: int = 0, log=None):
        try:
            import ray
        except ImportError:
            raise PimcError("--executor ray needs Ray: pip install 'pimc[ray]'")
        self.ray = ray
        self.log = log
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except Exception as e:  # Ray raises many types for a bad or unreachable address
                raise PimcError(f"--ray-address {address!r}: cannot connect to Ray ({str(e).splitlines()[0]})")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.shards = shards or max(1, cpus)
        self._count = ray.remote(num_cpus=1)(_count_shard)
        self._cal = ray.remote(num_cpus=1)(_bn_calibrate)

    def run(self, jobs: list[tuple], x: np.ndarray, y: np.ndarray, batch: int) -> list[dict]:
        ray = self.ray
        xr, yr = ray.put(x), ray.put(y)
        bounds = np.linspace(0, len(x), min(self.shards, len(x)) + 1).astype(int)
        models: dict[int, object] = {}
        futures = []
        t0 = time.perf_counter()
        for label, model, chip in jobs:
            ref = models.setdefault(id(model), ray.put(model))
            futures.append([self._count.remote(ref, chip, xr, yr, int(lo), int(hi), batch)
                            for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo])
        out = []
        for (label, _, _), fs in zip(jobs, futures):
            parts = ray.get(fs)
            r = {k: sum(p[k] for p in parts) for k in ("correct_top1", "correct_top5", "images")}
            r["seconds"] = time.perf_counter() - t0
            out.append(r)
            if self.log:
                self.log(f"{label}: {r['images']} images in {len(parts)} Ray tasks")
        return out

    def calibrate(self, model: bytes, chips: list, xc: np.ndarray, batch: int) -> list[tuple[bytes, dict]]:
        ref, xr = self.ray.put(model), self.ray.put(xc)
        return self.ray.get([self._cal.remote(ref, c, xr, batch) for c in chips])


def make_executor(kind: str, *, threads: int = 0, ray_address: str | None = None, shards: int = 0,
                  progress_factory=None, log=None):
    if kind == "local":
        return LocalExecutor(threads, progress_factory)
    if kind == "ray":
        return RayExecutor(ray_address, shards, log)
    raise PimcError(f"--executor: '{kind}' is not local or ray")
