"""PIM-QAT retraining hook (needs the ``torch`` extra; core pimc never imports torch).

    qm = pimc.train.prepare(module, compile_result)      # the compiled mapping drives the module
    pimc.train.fix_adc_steps(qm, True)                    # optional: ADC steps fixed, no step gradients (faster)
    ... any torch training loop over qm; between loss.backward() and opt.step():
    pimc.train.relative_adc_gradients(qm)                 # ADC steps learn relative to their compiled values
    pimc.train.sample_chip(qm, rng, chip)                 # variability-aware training
    pimc.train.export(qm, "out.pim.onnx")                 # back through the normal compiler

In eval mode ``qm`` computes what the exported IR computes, bit for bit (tests/test_train.py).
"""
try:
    import torch  # noqa: F401
except ImportError as e:   # pragma: no cover - depends on the install
    from pimc.core.errors import PimcError
    raise PimcError("pimc.train needs PyTorch: pip install 'pimc[torch]'") from e

from .loop import fix_adc_steps, relative_adc_gradients  # noqa: E402
from .model import QatModel, compile_module, export, export_onnx, prepare, sample_chip  # noqa: E402

__all__ = ["QatModel", "compile_module", "export", "export_onnx", "fix_adc_steps", "prepare", "relative_adc_gradients",
           "sample_chip"]
