"""The printed mapping summary of a compiled model."""
from __future__ import annotations

from collections import defaultdict


def _fmt(n) -> str:
    return "-" if n is None else f"{n:,}"


def mapping_summary(mapping, config: dict) -> str:
    """The table printed after a compile; ``mapping`` is a CompiledMapping or its JSON record."""
    from .core.mapping import CompiledMapping
    if isinstance(mapping, dict):
        mapping = CompiledMapping.from_record(mapping)
    lines = []
    ranges = sorted({L.adc.range for L in mapping.layers if L.adc is not None}) or [config["adc_range"]]
    head = (f"{'layer':<28} {'op':<6} {'tiles':>5} {'arrays':>6} {'rows used':>10} {'cols used':>10} "
            f"{'util':>6} {'slices':>7} {'ADC conv/inf':>14}")
    lines.append(f"scheme {config['scheme']}, {config['array_rows']}x{config['array_cols']} arrays, "
                 f"W{config['weight_bits']} A{config['input_bits']}, ADC {config['adc_bits']} bits ({'/'.join(ranges)}), "
                 f"cell bits {config['cell_bits'] or 'all'}, tile mode {config['tile_mode']}, BN folded into {config['fold_bn']}")
    lines.append(head)
    lines.append("-" * len(head))
    tot_arrays = tot_conv = 0
    tot_cells_used = tot_cells = 0
    conv_unknown = False
    for L in mapping.layers:
        t, sl = L.tiling, L.slicing
        name = L.name if len(L.name) <= 28 else "…" + L.name[-27:]
        why = f" by {'; '.join(L.rules)}" if L.rules else ""
        if not t:
            lines.append(f"{name:<28} {L.op_type:<6} {'(digital quantized' if L.weight_quant else '(float':>19}{why})")
            continue
        if L.rules:
            lines.append(f"{name:<28} {L.op_type:<6} (scheme {L.scheme or config['scheme']}{why})")
            name = ""
        arrays = t.arrays   # the record's array entries: {"rows": [0, used], "cols": [c0, c1], ...}
        rows = sum(a["rows"][1] for a in arrays)
        cols = sum(a["cols"][1] - a["cols"][0] for a in arrays)
        cells = sum(a["rows"][1] * (a["cols"][1] - a["cols"][0]) for a in arrays)
        slices = f"{sl.planes}x{len(sl.weight_slices)}" if sl else "1x1"
        conv = L.conversions_per_inference
        conv_unknown |= conv is None
        lines.append(f"{name:<28} {L.op_type:<6} {t.tiles_per_group * L.group:>5} {len(arrays):>6} "
                     f"{rows:>10,} {cols:>10,} {100 * t.utilization:>5.1f}% {slices:>7} {_fmt(conv):>14}")
        tot_arrays += len(arrays)
        tot_conv += conv or 0
        tot_cells_used += cells
        tot_cells += len(arrays) * t.array_rows * t.array_cols
    lines.append("-" * len(head))
    n_layers = len(mapping.layers)
    if tot_cells:
        lines.append(f"{'total':<28} {n_layers:>6} layers {tot_arrays:>6} arrays, utilization "
                     f"{100 * tot_cells_used / tot_cells:.1f}%, ADC conversions per inference {_fmt(tot_conv)}"
                     + (" (+ layers with dynamic spatial size)" if conv_unknown else ""))
    else:
        lines.append(f"{'total':<28} {n_layers} crossbar-eligible layers (no arrays at scheme {config['scheme']})")
    dig = defaultdict(list)
    for d in mapping.digital_ops:
        dig[(d["op_type"], d["reason"])].append(d["node"])
    if dig:
        lines.append("stayed digital:")
        for (op, reason), nodes in sorted(dig.items()):
            ex = ", ".join(nodes[:3]) + (", …" if len(nodes) > 3 else "")
            lines.append(f"  {len(nodes):>4} x {op:<20} {reason} ({ex})")
    cal = mapping.calibration or {}
    if cal:
        lines.append("calibration: " + ", ".join(f"{k}={v}" for k, v in cal.items()))
    return "\n".join(lines)
