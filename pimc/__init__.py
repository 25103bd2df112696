"""pimc: compile ONNX models to a processing-in-memory (PIM) IR.

Public entry points::

    import pimc
    result = pimc.compile_model("model.onnx", scheme="differential", adc_bits=6)
    result.save("model.pim.onnx")
    sess = pimc.open_session(result.model)
"""
__version__ = "0.1.0"

from .core.errors import PimcError  # noqa: E402
from .core.config import CompileConfig, build_config  # noqa: E402


def compile_model(*args, **kwargs):
    from .pipeline import compile_model as _c
    return _c(*args, **kwargs)


def open_session(*args, **kwargs):
    from pimc.runtime.session import open_session as _o
    return _o(*args, **kwargs)


__all__ = ["__version__", "PimcError", "CompileConfig", "build_config", "compile_model", "open_session"]
