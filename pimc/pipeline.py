"""The ordered pass list, with dumping and checking of every intermediate model.

``compile_model`` runs, by scheme:

=======================  ====================================================
float                    import_model, select_crossbar_layers, fold_batchnorm
digital                  ... + quantize_activations, quantize_weights
PIM schemes              ... + tile_crossbars, split_slices, insert_adc
=======================  ====================================================

and always ``finalize_ir`` last.  With ``dump_dir`` each intermediate model is
saved as ``NN_<pass>.onnx`` (runnable, with the mapping so far in its
metadata).  With ``verify`` each intermediate is checked with onnx.checker and
run on (up to 8) calibration samples; passes marked exact must reproduce the
previous model's outputs bit for bit, or compilation stops with an error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .core.config import CompileConfig, build_config, may_use
from .core.errors import PimcError
from .core.frozen import FrozenPlan
from .core.mapping import read_mapping
from .io import load_onnx, save_onnx_atomic
from .model import PimModel
from pimc import passes as P


# source-model metadata copied into every compiled model
CARRIED_METADATA = ("pimc.preprocess",)


def new_pim_model(proto: onnx.ModelProto, config: CompileConfig, source: str) -> PimModel:
    """The PimModel the first pass receives: the normalised, imported graph."""
    from pimc.passes.import_model import import_graph
    graph, opset, fixed_batch, note = import_graph(proto, source)
    carried = {p.key: p.value for p in proto.metadata_props if p.key in CARRIED_METADATA}
    return PimModel(graph=graph, config=config, opset=opset, source=source, carried_metadata=carried,
                    fixed_batch=fixed_batch, notes=[note] if note else [])


def pass_list(cfg: CompileConfig) -> list:
    steps = [P.ImportModel(), P.SelectCrossbarLayers(), P.FoldBatchNorm()]
    if may_use(cfg, "quantized"):   # the compile's scheme, or a per-layer rule's
        steps += [P.QuantizeActivations(), P.QuantizeWeights()]
    if may_use(cfg, "pim"):
        steps += [P.TileCrossbars(), P.SplitSlices(), P.InsertAdc()]
    steps.append(P.FinalizeIR())
    return steps


@dataclass
class CompileResult:
    model: onnx.ModelProto
    pim: PimModel
    timings: dict = field(default_factory=dict)
    verification: list = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        save_onnx_atomic(self.model, path)

    @property
    def mapping(self) -> dict:
        return self.pim.mapping()


def refuse_compiled(proto: onnx.ModelProto, source: str, command: str) -> None:
    """A one-line error when ``proto`` is already a pimc PIM IR: compiling it again would
    map the IR's own array ops a second time and report wrong figures."""
    from .core.names import DOMAIN
    from .core.mapping import compiled_source
    src = compiled_source(proto)
    if src is None and not any(o.domain == DOMAIN for o in proto.opset_import):
        return
    src = src or ""
    hint = f" ('{src}')" if src and src != "<memory>" else ""
    raise PimcError(f"'{source}' is already a pimc PIM IR; {command} takes the source ONNX model it was compiled "
                    f"from{hint}: pass that, or run the IR with `pimc run`")


def load_plan(plan) -> FrozenPlan | None:
    """A FrozenPlan from what ``compile_model(plan=...)`` accepts (None stays None)."""
    if plan is None or isinstance(plan, FrozenPlan):
        return plan
    if isinstance(plan, dict):
        return FrozenPlan.from_record(plan)
    if isinstance(plan, onnx.ModelProto):
        return FrozenPlan.from_mapping(read_mapping(plan, "plan"))
    path = Path(plan)
    if path.suffix == ".onnx":
        return FrozenPlan.from_mapping(read_mapping(load_onnx(path), f"--plan '{path}'"))
    if path.suffix == ".json":
        return FrozenPlan.from_json(path)
    raise PimcError(f"--plan: '{path}' is neither a JSON plan (.json) nor a compiled PIM IR (.onnx)")


def compile_model(model, config: CompileConfig | None = None, *, dump_dir: str | Path | None = None,
                  verify: bool = False, log=None, source: str | None = None, calib_inputs=None,
                  plan=None, **options) -> CompileResult:
    """Compile an ONNX model (path or ModelProto) to the PIM IR.

    ``config`` is a CompileConfig; or give ``preset=``, ``hw=`` and option
    keywords (``scheme=``, ``adc_bits=``, ...) as for ``build_config``.
    ``calib_inputs``: calibration arrays (see ``calibration.set_calibration_arrays``).
    ``plan``: a frozen plan (:class:`~pimc.core.frozen.FrozenPlan`, its JSON record, a
    ``.json`` file, or a compiled PIM IR whose values to keep): its input scales, weight
    column scales and ADC steps and zero points are used as given, never recomputed.
    """
    if config is None:
        config = build_config(**options)
    elif options:
        raise PimcError("give either a CompileConfig or option keywords, not both")
    if calib_inputs is not None and config.calib_data is not None:
        raise PimcError("give calibration inputs either as calib_inputs (arrays) or as calib_data (a file), not both")
    config = config.resolved(real_calibration=calib_inputs is not None or config.calib_data is not None)
    if isinstance(model, (str, Path)):
        source = source or str(model)
        proto = load_onnx(model)
    else:
        source, proto = source or "<memory>", model
    refuse_compiled(proto, source, "compile_model")
    pm = new_pim_model(proto, config, source)
    pm.frozen = load_plan(plan)
    if pm.frozen is not None:
        n = {k: sum(getattr(v, k) is not None for v in pm.frozen.layers.values())
             for k in ("input_scale", "weight_scales", "adc_step")}
        pm.notes.append(f"frozen plan{'' if not isinstance(plan, (str, Path)) else f' {str(plan)!r}'}: given input scales "
                        f"for {n['input_scale']}, weight scales for {n['weight_scales']}, ADC steps for {n['adc_step']} "
                        f"of {len(pm.frozen.layers)} layers, used as given")
    if calib_inputs is not None:
        from .calibration import set_calibration_arrays
        set_calibration_arrays(pm, calib_inputs)
    pm, timings, checks = run_passes(pm, pass_list(config), dump_dir=dump_dir, verify=verify, log=log)
    final = pm.to_onnx()
    return CompileResult(model=final, pim=pm, timings=timings, verification=checks)


def run_passes(pm: PimModel, steps: list, *, dump_dir: str | Path | None = None, verify: bool = False,
               log=None) -> tuple[PimModel, dict, list]:
    """The transform driver: run ``steps`` in order on ``pm``.  After each pass it removes
    dead nodes and sorts the graph (passes only transform), times the pass, saves the
    intermediate model as ``NN_<pass>.onnx`` under ``dump_dir``, and with ``verify``
    checks it with onnx.checker and runs it on calibration samples: a pass marked exact
    must not change one output bit.  Returns (model, seconds per pass, verification)."""
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
    timings, checks = {}, []
    prev_out = None
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        pm, changed = step.apply(pm)
        pm.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        pm.stage = step.name if step.name != "finalize_ir" else "final"
        timings[step.name] = time.perf_counter() - t0
        if log:
            log(f"pass {i + 1}/{len(steps)} {step.name}: {timings[step.name]:.2f} s"
                + ("" if changed else " (nothing to change)"))
        if dump_dir is not None or verify:
            proto_i = pm.to_onnx()
            if dump_dir is not None:
                save_onnx_atomic(proto_i, dump_dir / f"{i:02d}_{step.name}.onnx")
            if verify:
                onnx.checker.check_model(proto_i)
                # an unchanged model gives the previous outputs: no need to run it again
                out = _run_probe(pm, proto_i) if changed or prev_out is None else prev_out
                entry = {"pass": step.name, "exact": step.exact, "changed": bool(changed)}
                if prev_out is not None:
                    diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(out, prev_out))
                    entry["max_abs_change"] = diff
                    if step.exact and diff != 0.0:
                        raise PimcError(f"internal error: pass '{step.name}' must not change outputs but changed "
                                        f"them by up to {diff:g}; please report it with the input model")
                checks.append(entry)
                prev_out = out
    return pm, timings, checks


def _run_probe(pm: PimModel, proto: onnx.ModelProto) -> list[np.ndarray]:
    from pimc.runtime.session import open_session, run_batches
    from .calibration import calibration_inputs
    feed = {k: v[:8] for k, v in calibration_inputs(pm).items()}
    sess = open_session(proto)
    parts = [out for _, _, out in run_batches(sess, None, feed, 8)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
