"""Per-layer mapping records: what each pass decided for a crossbar layer.

A :class:`LayerPlan` is filled in stage by stage (quantize activations, quantize
weights, tile, slice, ADC) and is the single source from which
:mod:`pimc.lowering` emits the layer's ONNX nodes.  Its JSON form (``to_record``)
is the machine-readable mapping stored in the compiled model's metadata under
``pimc.mapping``: the contract read by the runtime, the reports and the
retraining hook.  Field meanings are documented in docs/IR.md ("Mapping").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from . import names as N


@dataclass
class InputQuant:
    scale: float
    bits: int
    signed: bool
    source: str  # "calibration" | "synthetic" | "file" | "memory" | "model" (QDQ) | "frozen" (a frozen plan)
    observed_min: float = 0.0
    observed_max: float = 0.0
    calibration: str | None = None   # the calibration method that chose the scale (pimc.core.calibrators)


@dataclass
class WeightQuant:
    bits: int
    q: np.ndarray       # integer-valued float32, same shape as the float weight
    scale: np.ndarray   # (Cout,) one scale per output column


@dataclass
class TilePlan:
    mode: str
    array_rows: int            # array rows R
    array_cols: int            # array columns C
    tiles_per_group: int       # T row tiles per group
    channels_per_tile: int     # m input channels gathered per tile
    tile_channels: np.ndarray  # (T, m) local input channel of each tile slot, -1 = padding
    mask: np.ndarray           # (T, m, kh, kw) 1 where the weight row lies on this tile
    rows_used: list[int]       # weight rows actually on each tile


@dataclass
class SlicePlan:
    planes: int                # P input slices (bit planes); 1 = multi-bit inputs
    plane_coef: np.ndarray     # (P,) recombination weight of each plane
    input_slice_range: tuple[float, float]   # value range of one input slice
    weight_slices: list[str]   # e.g. ["pos.c0", "neg.c0"] or ["c0", "c1"]
    slice_coef: np.ndarray     # (S,) recombination weight of each weight slice
    cell_range: tuple[int, int]  # value range of one weight cell
    weights: np.ndarray        # (S, Cout, cin_g, kh, kw) integer slice weights
    bit_serial: bool = False   # inputs enter as bit planes (BitPlanes), even a single one


@dataclass
class AdcPlan:
    bits: int
    range: str                 # "full" | "calibrated" | "frozen" (given by a frozen plan)
    step: np.ndarray           # (ncols,) step Delta per column
    zero_point: np.ndarray     # (ncols,) integer zero point per column
    s_min: np.ndarray          # (ncols,) range the scale was derived from
    s_max: np.ndarray
    calibration: str | None = None   # the calibration method of a calibrated range (pimc.core.calibrators)


@dataclass
class LayerPlan:
    name: str                  # the original node's name
    op_type: str               # Conv | Gemm | MatMul
    kind: str                  # "conv" (NCHW) or "fc" (..., K) viewed as 1x1 conv
    x: object                  # gs.Variable: layer input
    y: object                  # gs.Variable: layer output
    weight: np.ndarray         # float32 (Cout, cin_g, kh, kw)
    bias: np.ndarray | None    # float32 (Cout,) or None
    group: int = 1
    strides: list[int] = field(default_factory=lambda: [1, 1])
    pads: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dilations: list[int] = field(default_factory=lambda: [1, 1])
    auto_pad: str = "NOTSET"
    bn_output: tuple[np.ndarray, np.ndarray] | None = None  # (scale, shift) kept after the array
    folded_bn: str | None = None
    # BatchNorm folded into the output affine: gamma, beta, mean, var, eps and the
    # layer's own bias, kept so that `pimc calibrate-bn` can re-estimate mean/var
    bn_stats: dict | None = None
    in_spatial: list[int] | None = None   # input H, W seen (static shape or calibration)
    input_quant: InputQuant | None = None
    weight_quant: WeightQuant | None = None
    tiling: TilePlan | None = None
    slicing: SlicePlan | None = None
    adc: AdcPlan | None = None
    chunks: list[tuple[int, int, int, int]] | None = None   # (t0, t1, s0, s1) per chunk of array columns
    output_rescale: float | None = None   # a trained PIM-QAT rescaling factor in out_scale (frozen plan)
    # names of the source model's initializers this layer was built from (weight, bias, BatchNorm
    # scale/bias/mean/var): both torch exporters name them after the state_dict keys
    source_initializers: dict = field(default_factory=dict)
    scheme: str | None = None      # this layer's scheme (the compile's, or a per-layer rule's)
    rules: list = field(default_factory=list)   # the per-layer rules that set its options
    nodes: list = field(default_factory=list)   # gs.Node objects currently emitted

    # ---- shapes ----------------------------------------------------------
    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cin_g(self) -> int:
        return int(self.weight.shape[1])

    @property
    def cout_g(self) -> int:
        return self.cout // self.group

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def rows_per_column(self) -> int:
        """K: weight rows one output column sums in the unsplit layer."""
        kh, kw = self.kernel
        return self.cin_g * kh * kw

    @property
    def n_slices(self) -> int:
        return len(self.slicing.weight_slices) if self.slicing else 1

    @property
    def n_planes(self) -> int:
        return self.slicing.planes if self.slicing else 1

    @property
    def n_tiles(self) -> int:
        return self.tiling.tiles_per_group if self.tiling else 1

    @property
    def n_columns(self) -> int:
        """Array columns (one ADC each per conversion) over all tiles and slices."""
        return self.group * self.n_tiles * self.n_slices * self.cout_g

    def out_spatial(self) -> list[int] | None:
        if self.kind == "fc":
            return [1, 1]
        if not self.in_spatial:
            return None
        kh, kw = self.kernel
        out = []
        for i, (n, k) in enumerate(zip(self.in_spatial, (kh, kw))):
            s, d = self.strides[i], self.dilations[i]
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out.append(math.ceil(n / s))
            else:
                pad = 0 if self.auto_pad == "VALID" else self.pads[i] + self.pads[i + 2]
                out.append((n + pad - d * (k - 1) - 1) // s + 1)
        return out

    # ---- array assignment -------------------------------------------------
    def arrays(self) -> list[dict]:
        """One entry per physical array: group, tile, column range, rows used.

        Each (group, tile) gets its own arrays; its S*cout_g columns fill
        ceil(S*cout_g / C) arrays left to right.  Groups are not packed
        together on one array.
        """
        if not self.tiling:
            return []
        C = self.tiling.array_cols
        ncols_tile = self.n_slices * self.cout_g
        out = []
        for g in range(self.group):
            for t in range(self.tiling.tiles_per_group):
                for a in range(math.ceil(ncols_tile / C)):
                    c0 = a * C
                    out.append({"array": len(out), "group": g, "tile": t,
                                "rows": [0, int(self.tiling.rows_used[t])],
                                "cols": [c0, int(min(c0 + C, ncols_tile))]})
        return out

    def to_record(self) -> dict:
        """The JSON-able mapping record of this layer."""
        kh, kw = self.kernel
        rec = {
            "name": self.name, "op_type": self.op_type, "kind": self.kind,
            "input": self.x.name, "output": self.y.name,
            "cout": self.cout, "cin_per_group": self.cin_g, "group": self.group,
            "kernel": [kh, kw], "strides": list(self.strides), "pads": list(self.pads),
            "dilations": list(self.dilations), "auto_pad": self.auto_pad,
            "rows_per_column": self.rows_per_column,
            "bn": ("folded into " + self.folded_bn) if self.folded_bn else None,
            "output_spatial": self.out_spatial(),
            "source_initializers": dict(self.source_initializers),
        }
        if self.scheme is not None:
            rec["scheme"] = self.scheme
        if self.rules:
            rec["rules"] = list(self.rules)
        if self.output_rescale is not None:
            rec["output_rescale"] = float(self.output_rescale)
        if self.bn_stats is not None:
            rec["bn_stats"] = {k: (float(v) if np.ndim(v) == 0 else [float(x) for x in v])
                               for k, v in self.bn_stats.items()}
        if self.input_quant:
            iq = self.input_quant
            rec["input_quant"] = {"scale": float(iq.scale), "bits": iq.bits, "signed": bool(iq.signed),
                                  "source": iq.source, "observed_min": float(iq.observed_min),
                                  "observed_max": float(iq.observed_max)}
            if iq.calibration is not None:
                rec["input_quant"]["calibration"] = iq.calibration
        if self.weight_quant:
            wq = self.weight_quant
            rec["weight_quant"] = {"bits": wq.bits, "granularity": "column",
                                   "scale_tensor": N.tensor(self.name, N.OUT_SCALE),
                                   "scales": [float(v) for v in wq.scale]}
        if self.tiling:
            tp = self.tiling
            arrays = self.arrays()
            used = sum((a["rows"][1]) * (a["cols"][1] - a["cols"][0]) for a in arrays)
            rec["tiling"] = {"mode": tp.mode, "array_rows": tp.array_rows, "array_cols": tp.array_cols,
                             "tiles_per_group": tp.tiles_per_group, "channels_per_tile": tp.channels_per_tile,
                             "rows_used": [int(r) for r in tp.rows_used],
                             "tile_channels": tp.tile_channels.tolist(),
                             "arrays": arrays, "n_arrays": len(arrays),
                             "utilization": used / (len(arrays) * tp.array_rows * tp.array_cols) if arrays else 0.0}
        if self.slicing:
            sp = self.slicing
            rec["slicing"] = {"bit_serial": sp.bit_serial, "planes": sp.planes, "plane_coef": [float(v) for v in sp.plane_coef],
                              "input_slice_range": [float(v) for v in sp.input_slice_range],
                              "weight_slices": sp.weight_slices,
                              "slice_coef": [float(v) for v in sp.slice_coef],
                              "cell_range": [int(v) for v in sp.cell_range],
                              "column_order": ["group", "tile", "slice", "out_channel"]}
        if self.chunks:
            rec["chunks"] = [{"tiles": [c[0], c[1]], "slices": [c[2], c[3]],
                              "suffix": N.chunk_suffix(i, len(self.chunks))} for i, c in enumerate(self.chunks)]
        if self.adc:
            ad = self.adc
            rec["adc"] = {"bits": ad.bits, "range": ad.range, "columns": self.n_columns,
                          "scale_tensor": N.tensor(self.name, N.ADC_SCALE, "<suffix>"),
                          "zero_point_tensor": N.tensor(self.name, N.ADC_ZERO_POINT, "<suffix>"),
                          "lossless_columns": int(np.sum((ad.step == 1.0) & (ad.s_max - ad.s_min + 1 <= 2 ** ad.bits))),
                          # per array column, (group, tile, slice, out_channel) order: as in the IR's initializers
                          "step": [float(v) for v in np.asarray(ad.step, np.float32)],
                          "zero_point": [float(v) for v in np.asarray(ad.zero_point, np.float32)]}
            if ad.calibration is not None:
                rec["adc"]["calibration"] = ad.calibration
        if self.tiling and self.weight_quant:
            n = len(self.chunks) if self.chunks else 1
            sfx = [N.chunk_suffix(i, n) for i in range(n)]
            rec["tensors"] = {"array_weight": [N.tensor(self.name, N.ARRAY_WEIGHT, s) for s in sfx],
                              "array_mac": [N.output(self.name, N.ARRAY_MAC, s) for s in sfx],
                              "out_scale": N.tensor(self.name, N.OUT_SCALE),
                              "dequantize": N.node(self.name, N.DEQUANTIZE)}
            if self.adc:
                rec["tensors"].update(adc=[N.node(self.name, N.ADC, s) for s in sfx],
                                      adc_scale=[N.tensor(self.name, N.ADC_SCALE, s) for s in sfx],
                                      adc_zero_point=[N.tensor(self.name, N.ADC_ZERO_POINT, s) for s in sfx])
        if self.tiling:
            sp = self.out_spatial()
            per_pixel = self.n_planes * self.n_columns
            rec["conversions_per_output_pixel"] = per_pixel
            rec["conversions_per_inference"] = per_pixel * int(np.prod(sp)) if sp else None
        return rec


def tiles_width(tile_channels, t0: int, t1: int) -> int:
    """Input channels tiles t0..t1 read (``tile_channels``: (T, m) local channel per slot, -1 =
    padding): padding slots past the last real one are dropped.  The width of a chunk's array conv."""
    ch = np.asarray(tile_channels)[t0:t1]
    used = np.nonzero(np.any(ch >= 0, axis=0))[0]
    return int(used[-1]) + 1 if used.size else 1


def column_indices(groups: int, tiles: int, slices: int, cout_g: int, t0: int, t1: int, s0: int, s1: int) -> np.ndarray:
    """Global array-column indices, in (group, tile, slice, out_channel) order, of tiles
    [t0, t1) and slices [s0, s1) of a layer with the given counts."""
    gi, t, s, o = np.meshgrid(np.arange(groups), np.arange(t0, t1), np.arange(s0, s1), np.arange(cout_g), indexing="ij")
    return (((gi * tiles + t) * slices + s) * cout_g + o).reshape(-1)


def layer_graph(model_proto) -> nx.DiGraph:
    """Op-level dataflow graph of an ONNX model (node name -> node name)."""
    g = nx.DiGraph()
    producer = {}
    for i, n in enumerate(model_proto.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        g.add_node(name, op_type=n.op_type, domain=n.domain)
        for o in n.output:
            producer[o] = name
    for i, n in enumerate(model_proto.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        for t in n.input:
            if t in producer:
                g.add_edge(producer[t], name, tensor=t)
    return g


# ---- reading a compiled model's mapping ---------------------------------------------
# The compiled model's metadata ``pimc.mapping`` is the single source of truth after
# compilation.  Readers (chip instantiation, BN calibration, layer statistics, the
# summary, evaluation) read it only through these typed, pure-data classes: the
# field names are the record's own, so code and JSON say the same thing.

def _typed(cls, rec: dict | None):
    """A record sub-table as ``cls`` (unknown keys are an error: the record and the class agree)."""
    if rec is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(rec) - names
    if extra:
        raise ValueError(f"{cls.__name__}: unknown mapping fields {sorted(extra)}")
    return cls(**rec)


@dataclass(frozen=True)
class InputQuantRecord:
    scale: float
    bits: int
    signed: bool
    source: str
    observed_min: float = 0.0
    observed_max: float = 0.0
    calibration: str | None = None


@dataclass(frozen=True)
class WeightQuantRecord:
    bits: int
    granularity: str
    scale_tensor: str
    scales: list


@dataclass(frozen=True)
class TilingRecord:
    mode: str
    array_rows: int
    array_cols: int
    tiles_per_group: int
    channels_per_tile: int
    rows_used: list
    tile_channels: list
    arrays: list
    n_arrays: int
    utilization: float


@dataclass(frozen=True)
class SlicingRecord:
    bit_serial: bool
    planes: int
    plane_coef: list
    input_slice_range: list
    weight_slices: list
    slice_coef: list
    cell_range: list
    column_order: list


@dataclass(frozen=True)
class AdcRecord:
    bits: int
    range: str
    columns: int
    scale_tensor: str
    zero_point_tensor: str
    lossless_columns: int
    step: list          # per array column: the ADC step Delta
    zero_point: list    # per array column: the integer zero point z
    calibration: str | None = None   # calibrated ranges: the method (pimc.core.calibrators)


@dataclass(frozen=True)
class ChunkRecord:
    tiles: list        # [t0, t1)
    slices: list       # [s0, s1)
    suffix: str        # of the chunk's IR names (pimc.core.names)


@dataclass(frozen=True)
class LayerMapping:
    """One mapped layer as recorded in the compiled model (``LayerPlan.to_record``)."""
    name: str
    op_type: str
    kind: str
    input: str
    output: str
    cout: int
    cin_per_group: int
    group: int
    kernel: list
    strides: list
    pads: list
    dilations: list
    auto_pad: str
    rows_per_column: int
    bn: str | None
    output_spatial: list | None
    bn_stats: dict | None = None
    input_quant: InputQuantRecord | None = None
    weight_quant: WeightQuantRecord | None = None
    tiling: TilingRecord | None = None
    slicing: SlicingRecord | None = None
    chunks: tuple | None = None
    adc: AdcRecord | None = None
    conversions_per_output_pixel: int | None = None
    conversions_per_inference: int | None = None
    source_initializers: dict | None = None   # weight, bias, bn_scale, bn_bias, bn_mean, bn_var -> name
    tensors: dict | None = None               # the layer's IR tensor and node names (pimc.core.names), per chunk
    output_rescale: float | None = None       # trained PIM-QAT rescaling factor folded into out_scale
    scheme: str | None = None                 # the layer's scheme (differs from the compile's by a per-layer rule)
    rules: list | None = None                 # the per-layer rules (--digital-layers, [[layer]]) that set its options

    @classmethod
    def from_record(cls, rec: dict) -> "LayerMapping":
        subs = {"input_quant": InputQuantRecord, "weight_quant": WeightQuantRecord, "tiling": TilingRecord,
                "slicing": SlicingRecord, "adc": AdcRecord}
        vals = {k: (_typed(subs[k], v) if k in subs else v) for k, v in rec.items()}
        if rec.get("chunks") is not None:
            vals["chunks"] = tuple(_typed(ChunkRecord, c) for c in rec["chunks"])
        return _typed(cls, vals)

    def to_record(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name not in ("bn", "output_spatial"):
                continue
            if f.name == "chunks":
                v = [dataclasses.asdict(c) for c in v]
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            out[f.name] = v
        return out

    # ---- derived views ----------------------------------------------------------
    @property
    def cout_per_group(self) -> int:
        return self.cout // self.group

    @property
    def n_slices(self) -> int:
        return len(self.slicing.weight_slices) if self.slicing else 1

    @property
    def chunk_list(self) -> tuple:
        """The chunks of the layer's array columns (one covering all when the record lists none)."""
        if self.chunks:
            return self.chunks
        return (ChunkRecord(tiles=[0, self.tiling.tiles_per_group if self.tiling else 1], slices=[0, self.n_slices],
                            suffix=""),)

    def chunk_columns(self, chunk: ChunkRecord) -> np.ndarray:
        """Global column indices, (group, tile, slice, out_channel) order, of a chunk."""
        return column_indices(self.group, self.tiling.tiles_per_group, self.n_slices, self.cout_per_group,
                              *chunk.tiles, *chunk.slices)


@dataclass(frozen=True)
class CompiledMapping:
    """The whole mapping of a compiled model (metadata ``pimc.mapping``)."""
    pimc_version: str
    domain: str
    domain_version: int
    stage: str
    layers: tuple
    digital_ops: list
    calibration: dict
    notes: list
    source: str = "<memory>"

    @classmethod
    def from_record(cls, rec: dict) -> "CompiledMapping":
        vals = dict(rec)
        vals["layers"] = tuple(LayerMapping.from_record(L) for L in rec["layers"])
        return _typed(cls, vals)

    def to_record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["layers"] = [L.to_record() for L in self.layers]
        return out

    def layer(self, name: str) -> LayerMapping:
        return next(L for L in self.layers if L.name == name)


def mac_expansion(mapping: CompiledMapping) -> float:
    """Multiply-accumulates of the compiled graph over those of the float model: per chunk,
    planes x groups x tiles x slices x out channels x the channels its widest tile reads x
    kernel x output pixels (short last tiles have chunks of their own); digital layers count
    once.  Needs the layers' output sizes (static shapes or calibration)."""
    compiled = flt = 0
    for L in mapping.layers:
        kh, kw = L.kernel
        pix = int(np.prod(L.output_spatial))
        macs = L.cout * L.cin_per_group * kh * kw * pix
        flt += macs
        if L.tiling is None:
            compiled += macs
            continue
        for ch in L.chunk_list:
            (t0, t1), (s0, s1) = ch.tiles, ch.slices
            width = tiles_width(L.tiling.tile_channels, t0, t1)
            compiled += L.slicing.planes * L.group * (t1 - t0) * (s1 - s0) * L.cout_per_group * width * kh * kw * pix
    return compiled / flt


IR_VERSION = 2   # of the compiled model's metadata; 1: before the typed mapping (pimc.ir_version absent)


def read_mapping(model, source: str = "model") -> CompiledMapping:
    """The mapping of a compiled model (an onnx ModelProto), or a one-line PimcError: not a
    pimc IR, or written by an older pimc (recompile it)."""
    import json

    from .errors import PimcError
    meta = {p.key: p.value for p in model.metadata_props}
    if "pimc.mapping" not in meta:
        raise PimcError(f"'{source}' is not a pimc PIM IR model (no pimc.mapping metadata); compile it with "
                        f"'pimc compile' first, or drop the PIM options")
    version = int(meta.get("pimc.ir_version", "1"))
    if version != IR_VERSION:
        raise PimcError(f"'{source}' was compiled by {'an older' if version < IR_VERSION else 'a newer'} pimc "
                        f"(IR version {version}, this pimc reads {IR_VERSION}); recompile the source model with "
                        f"this pimc's 'pimc compile'")
    try:
        return CompiledMapping.from_record(json.loads(meta["pimc.mapping"]))
    except (ValueError, TypeError, KeyError) as e:
        raise PimcError(f"'{source}': its pimc.mapping metadata is damaged ({e}); recompile the source model")


def compiled_source(model) -> str | None:
    """The source model a compiled model (any IR version) was compiled from: its path,
    "" when unknown, None when ``model`` is no pimc IR."""
    import json
    meta = {p.key: p.value for p in model.metadata_props}
    if "pimc.mapping" not in meta:
        return None
    try:
        return str(json.loads(meta["pimc.mapping"]).get("source") or "")
    except (ValueError, AttributeError):
        return ""
