"""The one object that travels through the compiler.

:class:`PimModel` wraps the graph being compiled (an onnx-graphsurgeon graph),
the compile config, the crossbar layers claimed so far with their plans, and
the list of ops kept digital.  Every pass takes a PimModel and returns it;
:meth:`to_onnx` gives a complete, runnable ONNX model at any stage (the IR ops
used come with their function bodies, the metadata with the mapping so far).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .core.config import CompileConfig
from .core.frozen import FrozenLayer, FrozenPlan
from .core.mapping import LayerPlan
from .core.names import DOMAIN, DOMAIN_VERSION
from pimc.runtime.ops import function_protos

IR_VERSION_MAX = 10  # onnxruntime 1.20+ reads IR 10; models written by pimc use it


@dataclass
class PimModel:
    graph: gs.Graph
    config: CompileConfig
    opset: int
    source: str = "<memory>"
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    digital_ops: list[dict] = field(default_factory=list)   # {"node", "op_type", "reason"}
    notes: list[str] = field(default_factory=list)          # facts for the report (e.g. calibration source)
    calibration: dict = field(default_factory=dict)         # where calibration data came from (recorded)
    calib_inputs: dict | None = None                         # name -> array, loaded once (not recorded)
    stage: str = "imported"
    carried_metadata: dict = field(default_factory=dict)   # source metadata kept in the IR (pimc.preprocess)
    fixed_batch: int | None = None   # the batch the graph depends on (None: any batch); see passes/free_batch.py
    frozen: FrozenPlan | None = None  # values given by the caller, used as given (pimc.core.frozen)
    layer_configs: dict = field(default_factory=dict)   # layer name -> CompileConfig after per-layer rules

    def layer_config(self, name: str) -> CompileConfig:
        """The options of layer ``name``: the compile config with the per-layer rules that match it
        (``--digital-layers``, the hardware file's [[layer]] tables) applied."""
        return self.layer_configs.get(name, self.config)

    def frozen_layer(self, name: str) -> FrozenLayer:
        """The caller's frozen values of layer ``name`` (all None when there are none)."""
        return self.frozen.get(name) if self.frozen is not None else FrozenLayer()

    def mapping(self) -> dict:
        return {
            "pimc_version": __version__,
            "domain": DOMAIN, "domain_version": DOMAIN_VERSION,
            "stage": self.stage,
            "source": self.source,
            "layers": [p.to_record() for p in self.layers.values()],
            "digital_ops": self.digital_ops,
            "calibration": self.calibration,
            "notes": self.notes,
        }

    def to_onnx(self) -> onnx.ModelProto:
        g = self.graph.cleanup().toposort()
        g.opset = self.opset
        used = sorted({n.op for n in g.nodes if n.domain == DOMAIN})
        # functions carried in from the source model stay; ours are re-attached
        g.functions = [f for f in g.functions if f.domain != DOMAIN]
        model = gs.export_onnx(g, do_type_check=False)
        if used:
            model.functions.extend(function_protos(used))
        opsets = {o.domain: o.version for o in model.opset_import}
        opsets[""] = self.opset
        if used:
            opsets[DOMAIN] = DOMAIN_VERSION
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
        model.ir_version = IR_VERSION_MAX
        model.producer_name = "pimc"
        model.producer_version = __version__
        from .core.mapping import IR_VERSION
        meta = {"pimc.version": __version__, "pimc.ir_version": str(IR_VERSION), "pimc.config": self.config.to_json(),
                "pimc.mapping": json.dumps(self.mapping(), sort_keys=True), "pimc.stage": self.stage,
                **self.carried_metadata}
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        return model
