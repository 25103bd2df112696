"""Names of a mapped layer's IR tensors and nodes, and the roles of the IR ops.

Every IR tensor and node of a crossbar layer lives under the layer's prefix
``{layer}/pimc/``, followed by its role (``array_mac``, ``adc``, ``out_scale``, ...)
and, where a layer's array columns are processed in several chunks, the chunk's
suffix (``_0``, ``_1``, ...; empty for a single chunk).  A node named N writes the
tensor ``N:0``.  Only this module spells these names: the emitter writes them, and
chip instantiation, BN calibration, layer statistics and the probes of the
calibration passes find tensors and nodes through the same functions.
"""
from __future__ import annotations

DOMAIN = "ai.pimc"        # the IR op domain
DOMAIN_VERSION = 1

# ---- op roles ---------------------------------------------------------------------
#: ops that convert array partial sums with an ADC (ideal and non-ideal, plain and fused)
ADC_OPS = frozenset({"AdcQuantize", "AdcRecombine", "AdcQuantizeNonIdeal", "AdcRecombineNonIdeal"})
#: ops that recombine array columns (planes, tiles, slices) into output channels
RECOMBINE_OPS = frozenset({"Recombine", "AdcRecombine", "AdcRecombineNonIdeal"})
#: the fused array conv + ADC + recombination ops a native session rewrites chunks into
#: (pimc.runtime.fuse; never written by the compiler)
FUSED_ARRAY_OPS = frozenset({"ConvAdcRecombine", "ConvAdcRecombineNonIdeal"})
#: ops that read the array MAC outputs (NCHW partial sums) directly
ARRAY_READER_OPS = ADC_OPS | RECOMBINE_OPS | FUSED_ARRAY_OPS
#: the non-ideal op that replaces each ideal ADC op on a chip
NONIDEAL_OP = {"AdcQuantize": "AdcQuantizeNonIdeal", "AdcRecombine": "AdcRecombineNonIdeal"}
#: the ONNX op computing a layer's array MACs
ARRAY_MAC_OP = "Conv"


def is_adc(node) -> bool:
    """Whether an ONNX NodeProto (or graphsurgeon Node) is an IR ADC op."""
    domain = getattr(node, "domain", "")
    op = getattr(node, "op_type", None) or getattr(node, "op", None)
    return domain == DOMAIN and op in ADC_OPS


# ---- names ------------------------------------------------------------------------
def prefix(layer: str) -> str:
    """The prefix of every IR tensor and node of ``layer`` (the source node's name)."""
    return f"{layer}/pimc/"


def chunk_suffix(index: int, chunks: int) -> str:
    """Suffix of chunk ``index`` of ``chunks``: empty when the layer has one chunk."""
    return f"_{index}" if chunks > 1 else ""


def tensor(layer: str, role: str, suffix: str = "") -> str:
    """An initializer (constant) of the layer: ``{layer}/pimc/{role}{suffix}``."""
    return f"{prefix(layer)}{role}{suffix}"


def node(layer: str, role: str, suffix: str = "") -> str:
    """A node of the layer: ``{layer}/pimc/{role}{suffix}``."""
    return f"{prefix(layer)}{role}{suffix}"


def output(layer: str, role: str, suffix: str = "") -> str:
    """The tensor the node ``node(layer, role, suffix)`` writes."""
    return node(layer, role, suffix) + ":0"


def chip_lut(bits: int) -> str:
    """The shared transfer-curve table of a chip for ``bits``-bit ADCs."""
    return f"pimc/chip/lut{bits}"


def probe(*parts) -> str:
    """A temporary output added by a calibration or statistics probe."""
    return "pimc_probe/" + "/".join(str(p) for p in parts)


# roles the emitter and the readers share (the others are private to the emitter)
ARRAY_MAC = "array_mac"
ARRAY_WEIGHT = "array_weight"
ADC = "adc"
ADC_SCALE = "adc_scale"
ADC_ZERO_POINT = "adc_zero_point"
DEQUANTIZE = "dequantize"
SUM_CHUNKS = "sum_chunks"
BIAS = "bias"
QUANTIZE_INPUT = "q_in"
OUT_SCALE = "out_scale"
OUT_BIAS = "out_bias"
CHIP_GAIN = "chip_gain"
CHIP_OFFSET = "chip_offset"
