"""pimc.passes: the compiler's transformations, one module per pass.

Each pass is a :class:`~pimc.passes.base.Transformation` whose docstring states
its contract: what it accepts and what it guarantees.  ``apply(model)`` returns
``(model, changed)``.  :mod:`pimc.pipeline` runs them in order.
"""
from .base import Transformation
from .import_model import ImportModel
from .select_crossbar_layers import SelectCrossbarLayers
from .fold_batchnorm import FoldBatchNorm
from .quantize_activations import QuantizeActivations
from .quantize_weights import QuantizeWeights
from .tile_crossbars import TileCrossbars
from .split_slices import SplitSlices
from .insert_adc import InsertAdc
from .finalize_ir import FinalizeIR

__all__ = ["Transformation", "ImportModel", "SelectCrossbarLayers", "FoldBatchNorm", "QuantizeActivations",
           "QuantizeWeights", "TileCrossbars", "SplitSlices", "InsertAdc", "FinalizeIR"]
