"""Base class of all passes."""
from __future__ import annotations

from pimc.model import PimModel


class Transformation:
    """A named model-to-model step.

    Subclasses set ``name`` (used for dumps: ``NN_<name>.onnx``) and
    ``exact`` (True when the pass must not change the model's outputs at all;
    the pipeline's ``verify`` checks it bit for bit), and implement
    :meth:`apply`.  A pass reads only the model it is given and its config, and
    only transforms: the driver (``pimc.pipeline.run_passes``) removes dead nodes
    and sorts the graph after every pass that reports a change, times it, dumps
    the intermediate model and verifies it.  ``apply`` returns ``(model, changed)``.
    """

    name = "transformation"
    exact = False

    def apply(self, model: PimModel) -> tuple[PimModel, bool]:  # pragma: no cover - interface
        raise NotImplementedError
