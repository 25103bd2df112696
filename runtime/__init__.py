"""pimc.runtime: the PIM IR op library and onnxruntime session helpers."""
from .ops import DOMAIN, DOMAIN_VERSION, OPS, function_protos
from .session import open_session

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "function_protos", "open_session"]
