"""The ``pimc`` command line.

Built on click (already a dependency of much of the Python tooling here, well
kept, and it gives typed options, choices and generated --help for free).
Every user error is one line on stderr, ``pimc: error: ...``, exit status 2,
no traceback and no partial output file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .core.config import ADC_RANGES, FOLD_BN, PRESETS, SCHEMES, TILE_MODES, CompileConfig
from .core.errors import PimcError

_D = CompileConfig()


def _err(msg: str) -> None:
    click.echo(f"pimc: error: {msg}", err=True)


def _option_block(options_name: str):
    """A decorator applying a list of click options (looked up at decoration time)."""
    def decorate(f):
        for o in reversed(globals()[options_name]):
            f = o(f)
        return f
    return decorate


compile_options = _option_block("_COMPILE_OPTIONS")   # shared by `pimc compile`, `pimc eval` and `pimc sweep`
chip_options = _option_block("_CHIP_OPTIONS")         # chip settings, shared by `pimc run` and `pimc eval`


_COMPILE_OPTIONS = [
    click.option("--scheme", type=click.Choice(SCHEMES), help="Decomposition (column layouts with a worked example: "
                  "README, Schemes): float (no quantization); digital (quantized, no arrays); native (multi-bit "
                  "inputs, each signed weight in one column, 1 conversion per column); differential (w = w+ - w-: "
                  "two unsigned columns per output channel, 2 conversions); bit-serial (inputs one bit per cycle, "
                  "b_x conversions per column, each signed weight still in ONE column); bit-serial+differential "
                  "(bit-serial inputs and +/- weight columns, 2 b_x conversions: the layout many papers call "
                  "bit-serial).  --cell-bits splits each weight over cells.  "
                  f"[default: {_D.scheme}]"),
    click.option("--adc-bits", type=int, help=f"ADC resolution in bits.  [default: {_D.adc_bits}]"),
    click.option("--array-rows", type=int, help=f"Crossbar rows R (inputs summed per conversion).  [default: {_D.array_rows}]"),
    click.option("--array-cols", type=int, help=f"Crossbar columns C (ADC-converted outputs per array).  [default: {_D.array_cols}]"),
    click.option("--weight-bits", type=int, help=f"Weight bits (signed, symmetric, one scale per output column).  [default: {_D.weight_bits}]"),
    click.option("--input-bits", type=int, help=f"Input activation bits (unsigned after ReLU, else signed).  [default: {_D.input_bits}]"),
    click.option("--cell-bits", type=int, help="Weight bits per cell; a weight spans ceil(bits/cell) cells.  0 = whole weight "
                  "(or differential magnitude) in one cell.  [default: 0]"),
    click.option("--tile-mode", type=click.Choice(TILE_MODES), help="channel: whole kernels per array, floor(R/(kh*kw)) "
                  f"input channels per tile; row: exactly R rows per tile, kernels may straddle arrays.  [default: {_D.tile_mode}]"),
    click.option("--adc-range", type=click.Choice(ADC_RANGES), help="full: worst-case partial-sum range per column (never "
                  "clips); calibrated: per-column range from the calibration data, by --adc-calib; auto: calibrated when real "
                  "calibration data is given (--calib-data, or the calibration images of eval/sweep), else full.  "
                  f"[default: {_D.adc_range}]"),
    click.option("--calib-samples", type=int, help=f"Use at most this many calibration samples.  [default: {_D.calib_samples}]"),
    click.option("--act-calib", metavar="METHOD[:P]", help="How each layer's input range is calibrated: max (observed "
                  "max |x|), percentile[:P] (P-th percentile of |x|, P=99.99 if not given), mse (the clipping range with "
                  "the least quantization MSE), entropy (least KL divergence, as TensorRT).  Histograms stream over the "
                  f"calibration data (README: Calibration).  [default: {_D.act_calib}]"),
    click.option("--adc-calib", metavar="METHOD[:P]", help="How each ADC column's partial-sum range is calibrated (with "
                  "--adc-range calibrated): max (observed min/max), percentile[:P] (tails of (100-P)/2 % cut on each "
                  f"side), mse, entropy, searched per column.  [default: {_D.adc_calib}]"),
    click.option("--digital-layers", metavar="LIST", help="Keep these layers digital (quantized, no arrays, no ADC): "
                  "comma list of ONNX node names or globs (e.g. '/layer1/*'), weight names, and first / last (the "
                  "first and last mapped layer).  A name that matches nothing is an error.  Per-layer options of "
                  "any kind: [[layer]] tables in --hw (README).  [default: none]"),
    click.option("--fold-bn", type=click.Choice(FOLD_BN), help="Fold BatchNorm into the weights (the arrays hold folded "
                  f"weights) or into the per-column output affine after the ADC.  [default: {_D.fold_bn}]"),
    click.option("--seed", type=int, help=f"Seed of every random draw at compile time (synthetic calibration).  [default: {_D.seed}]"),
    click.option("--chunk-mib", type=int, help="Process a layer's array columns in chunks so that one chunk's partial "
                  f"sums stay under this many MiB at batch 256 (bounds runtime memory).  [default: {_D.chunk_mib}]"),
    click.option("--hw", "hw", type=click.Path(path_type=Path), help="Hardware description TOML file (format in README.md); "
                  "explicit options override it."),
    click.option("--preset", type=click.Choice(list(PRESETS)), help="Named configuration (see `pimc presets`); --hw and "
                  "explicit options override it.")
]
_CHIP_OPTIONS = [
    click.option("--adc", type=click.Choice(["ideal", "nonideal"]), help="ADC model.  [default: ideal]"),
    click.option("--chip-seed", type=int, help="Chip instance: the seed of every static draw and of the noise.  [default: 0]"),
    click.option("--gain-sigma", type=float, help="ADC gain spread per column, N(1, sigma).  [default: 0.024]"),
    click.option("--offset-sigma", type=float, help="ADC offset spread per column, N(0, sigma) LSB.  [default: 2.04]"),
    click.option("--noise-sigma", type=float, help="Thermal noise per conversion, N(0, sigma) LSB.  [default: 0]"),
    click.option("--inl", type=float, help="Synthetic transfer-curve nonlinearity (bow), INL in LSB.  [default: 0]"),
    click.option("--adc-lut", "lut_csv", type=click.Path(path_type=Path), help="Measured transfer curve (CSV of 2^b levels)."),
    click.option("--device-sigma-cell", type=float, help="Cell conductance variation within a chip (lognormal sigma).  [default: 0]"),
    click.option("--device-sigma-chip", type=float, help="Conductance variation between chips (lognormal sigma).  [default: 0]"),
    click.option("--device-scope", type=click.Choice(["chip", "layer"]), help="theta_chip drawn once per chip or per layer.  [default: chip]")
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pimc")
def cli():
    """pimc: compile ONNX models to a processing-in-memory (PIM) IR and run them in onnxruntime."""


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output PIM IR model.  [default: MODEL with .pim.onnx suffix, beside MODEL]")
@compile_options
@click.option("--calib-data", type=click.Path(path_type=Path), help="Calibration inputs: .npy, or .npz with an array "
              "named 'x' or after the model input, preprocessed as the model expects (use training, never evaluation, "
              "data).  [default: 64 synthetic N(0,1) inputs, with a warning]")
@click.option("--plan", "plan", type=click.Path(dir_okay=False, path_type=Path), help="Frozen plan: per-layer "
              "input scales, weight column scales and ADC steps/zero points used as given, never recomputed (a JSON "
              "plan, see docs/IR.md, or a compiled .pim.onnx whose values to keep, e.g. after retraining).")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), help="Save every intermediate model "
              "there as NN_<pass>.onnx.")
@click.option("--verify", is_flag=True, help="Check and run every intermediate model on calibration samples; "
              "exact passes must not change any output bit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the mapping (JSON) to this file.")
@click.option("-q", "--quiet", is_flag=True, help="Print no summary.")
@click.option("-v", "--verbose", is_flag=True, help="Print each pass and its time (on stderr) as it runs.")
def compile_cmd(model, output, hw, preset, plan, dump_dir, verify, json_path, quiet, verbose, **opts):
    """Compile MODEL (an ONNX file) to the PIM IR."""
    import json

    from .core.config import build_config
    from .io import check_output_path, load_onnx, write_bytes_atomic
    from .pipeline import compile_model, refuse_compiled
    from .summary import mapping_summary

    if opts.get("calib_data") is not None:
        opts["calib_data"] = str(opts["calib_data"])
    cfg = build_config(preset=preset, hw=hw, **opts)
    if output is None:
        output = model.with_name(model.name[: -len(".onnx")] + ".pim.onnx" if model.name.endswith(".onnx")
                                 else model.name + ".pim.onnx")
    if output.resolve() == model.resolve():
        raise PimcError(f"-o: output '{output}' would overwrite the input model; choose another path")
    check_output_path(output, "-o")
    if json_path is not None:
        check_output_path(json_path, "--json")
    if dump_dir is not None:
        check_output_path(dump_dir, "--dump-dir", directory=True)
    proto = load_onnx(model)
    refuse_compiled(proto, str(model), "pimc compile")
    log = (lambda m: click.echo(m, err=True)) if verbose else None
    res = compile_model(proto, cfg, dump_dir=dump_dir, verify=verify, log=log, source=str(model), plan=plan)
    res.save(output)
    if json_path:
        write_bytes_atomic(json.dumps(res.mapping, indent=1, sort_keys=True).encode(), json_path, "--json")
    if not quiet:
        click.echo(mapping_summary(res.mapping, res.pim.config.to_dict()))
        for v in res.verification:
            if "max_abs_change" in v:
                click.echo(f"verify {v['pass']:<24} max |change| {v['max_abs_change']:.3g}" + (" (exact)" if v["exact"] else ""))
        click.echo(f"wrote {output}")


@cli.command("presets")
def presets_cmd():
    """List the named compile configurations (--preset) and chips (--chip-preset)."""
    from pimc.core.chip import CHIP_PRESETS
    click.echo("compile presets (--preset, for pimc compile, eval and sweep):")
    for name, (desc, vals) in PRESETS.items():
        click.echo(f"  {name}\n    {desc}\n    " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vals.items()))
    click.echo("chip presets (--chip-preset, for pimc run, eval, sweep and calibrate-bn):")
    for name, (desc, vals) in CHIP_PRESETS.items():
        click.echo(f"  {name}\n    {desc}\n    " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vals.items()))


@cli.command("demo")
@click.option("--scheme", type=click.Choice(SCHEMES[2:]), default="differential", show_default=True,
              help="PIM decomposition scheme.")
@click.option("--adc-bits", type=int, multiple=True, default=(3, 4, 5, 6), show_default=True,
              help="ADC resolution; repeat for several.")
@click.option("--weight-bits", type=int, default=4, show_default=True)
@click.option("--input-bits", type=int, default=4, show_default=True)
@click.option("--array-rows", type=int, default=128, show_default=True)
@click.option("--cell-bits", type=int, default=0, show_default=True)
def demo_cmd(**opts):
    """Compile the embedded digits CNN; print float vs digital vs PIM accuracy (no downloads, no data needed)."""
    from .demo import run_demo
    run_demo(echo=click.echo, **opts)


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "inputs", multiple=True, required=True, metavar="[NAME=]FILE",
              help="Input array (.npy, or .npz with arrays named after the model inputs); repeat as NAME=FILE for "
                   "models with several inputs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npy (one model output) or .npz (several).  [default: MODEL stem + .out.npy/.npz]")
@click.option("--chip-preset", type=click.Choice(["pimqat-chip7", "ideal"]), help="Named chip (pimqat-chip7: the "
              "PIM-QAT 7-bit prototype's gain and offset spread).")
@click.option("--hw", type=click.Path(path_type=Path), help="Hardware TOML file; its [nonideal] table sets the chip.")
@chip_options
@click.option("--batch-size", type=int, default=256, show_default=True, help="Run the inputs in batches of this size.")
@click.option("--function-bodies", is_flag=True, help="Do not use the native kernels.")
def run_cmd(model, inputs, output, chip_preset, hw, batch_size, function_bodies, **chip_opts):
    """Run MODEL (a PIM IR, or plain ONNX without chip options) on inputs; write the outputs as .npy/.npz."""
    import numpy as np

    from .io import check_output_path, load_array_file, write_bytes_atomic
    from pimc.core.chip import build_chip_config
    from pimc.runtime.session import open_session, run_batches

    if batch_size < 1:
        raise PimcError(f"--batch-size: {batch_size} must be at least 1")
    if output is not None:
        check_output_path(output, "-o", suffixes=(".npy", ".npz"))
    if chip_opts.get("lut_csv") is not None:
        chip_opts["lut_csv"] = str(chip_opts["lut_csv"])
    pim_asked = chip_preset is not None or hw is not None or any(v is not None for v in chip_opts.values())
    chip = build_chip_config(preset=chip_preset, hw=hw, **chip_opts) if pim_asked else None
    sess = open_session(str(model), chip, native=False if function_bodies else None)
    feed = _read_inputs(sess, inputs, load_array_file)
    names = [o.name for o in sess.get_outputs()]
    if output is None:
        stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
        output = check_output_path(model.with_name(stem + (".out.npy" if len(names) == 1 else ".out.npz")), "-o")
    elif output.suffix == ".npy" and len(names) > 1:
        raise PimcError(f"-o: the model has {len(names)} outputs ({', '.join(names)}); give an .npz path")
    parts = {k: [] for k in names}
    for _, _, out in run_batches(sess, None, feed, batch_size):
        for k, v in zip(names, out):
            parts[k].append(v)
    outs = {k: np.concatenate(v) for k, v in parts.items()}
    import io as _io
    buf = _io.BytesIO()
    if output.suffix == ".npy":
        np.save(buf, next(iter(outs.values())))
    else:
        np.savez(buf, **outs)
    write_bytes_atomic(buf.getvalue(), output)
    click.echo(f"wrote {output} ({', '.join(f'{k} {list(v.shape)}' for k, v in outs.items())})")


def _read_inputs(sess, specs, load):
    import numpy as np
    model_inputs = {i.name: i for i in sess.get_inputs()}
    feed = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        arrays = load(path, "--input")
        for key, arr in arrays.items():
            target = name or key
            if target in ("", "x") and len(model_inputs) == 1:
                target = next(iter(model_inputs))
            if target not in model_inputs:
                raise PimcError(f"--input: '{path}' gives '{target}', but the model's inputs are: {', '.join(model_inputs)}")
            feed[target] = arr
    for name, info in model_inputs.items():
        if name not in feed:
            raise PimcError(f"--input: no array for model input '{name}'")
        a = feed[name]
        want = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}.get(info.type)
        if want is not None and a.dtype != want:
            raise PimcError(f"--input: '{name}' is {a.dtype}, the model wants {np.dtype(want)}; convert the array")
        shape = info.shape   # the leading (batch) dimension is free: a fixed batch is fed in batches of its size
        if a.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], a.shape[1:])):
            raise PimcError(f"--input: '{name}' has shape {list(a.shape)}, the model wants {shape}")
        if a.shape[0] == 0:
            raise PimcError(f"--input: '{name}' holds no samples")
    sizes = {a.shape[0] for a in feed.values()}
    if len(sizes) != 1:
        raise PimcError(f"--input: the arrays disagree on the batch size: {sorted(sizes)}")
    return feed


_CHIP_KEYS = ("adc", "chip_seed", "gain_sigma", "offset_sigma", "noise_sigma", "inl", "lut_csv",
              "device_sigma_cell", "device_sigma_chip", "device_scope")

_DATA_OPTIONS = [
    click.option("--data", required=True, type=click.Path(path_type=Path),
                 help="Images: a CIFAR-10/100 python directory, an .npz (x uint8 NHWC, y) or a folder of class folders."),
    click.option("--scale", type=float, help="Preprocessing: x * scale ...  [default: the model's metadata "
                 "pimc.preprocess, else 1/255]"),
    click.option("--mean", help="... minus this per-channel mean (comma list) ...  [default: metadata, else 0]"),
    click.option("--std", help="... over this per-channel std (comma list).  [default: metadata, else 1]  "
                 "The shared ResNet-20 (its export records them): --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225."),
    click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="[default: metadata, else NCHW]"),
    click.option("--batch-size", type=int, default=256, show_default=True),
]
data_options = _option_block("_DATA_OPTIONS")

_EVAL_OPTIONS = [
    click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True),
    click.option("--calib-from", "calib_from", type=click.Path(path_type=Path),
                 help="Calibration images (same formats).  [default: --data]"),
    click.option("--calib-split", type=click.Choice(["train", "test"]), default="train", show_default=True,
                 help="Split of the calibration images; never the evaluation images."),
    click.option("--chips", type=int, default=0, show_default=True, help="Non-ideal PIM: evaluate this many chip "
                 "instances (seeds --chip-seed, --chip-seed+1, ...)."),
    click.option("--chip-preset", type=click.Choice(["pimqat-chip7", "ideal"]), help="Named chip for --chips."),
    click.option("--calibrate-bn", is_flag=True, help="Also evaluate every chip after BN calibration on the "
                 "calibration images (needs --fold-bn output; see `pimc calibrate-bn`)."),
    click.option("--limit", type=int, help="Evaluate only the first N images."),
    click.option("--stats-images", type=int, default=64, show_default=True, help="Per-layer SQNR, ADC clipping and "
                 "code histograms on this many of the images (0: none)."),
    click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="local: this machine, every session on all cores; ray: chips and data shards as Ray tasks "
                 "(pip install 'pimc[ray]')."),
    click.option("--ray-address", help="Ray cluster address for --executor ray.  [default: start a local Ray]"),
    click.option("--shards", type=int, default=0, help="Data shards per model for --executor ray.  [default: the "
                 "cluster's CPUs]"),
    click.option("--threads", type=int, default=0, help="onnxruntime threads per session, local executor.  "
                 "[default: all cores]"),
]
eval_options = _option_block("_EVAL_OPTIONS")


def _prep(model, scale, mean, std, layout) -> dict:
    """Preprocessing: the options given, else the model's metadata (``model`` None: none), else the defaults."""
    from .datasets import PREPROCESS_DEFAULTS, model_preprocess
    prep = dict((model_preprocess(model) if model is not None else None) or PREPROCESS_DEFAULTS)
    for option, key, text in (("--mean", "mean", mean), ("--std", "std", std)):
        if text is not None:
            try:
                prep[key] = [float(v) for v in text.split(",")]
            except ValueError:
                raise PimcError(f"{option}: '{text}' is not a comma list of numbers (one per channel, e.g. "
                                f"0.485,0.456,0.406)")
    if any(v == 0 for v in prep["std"]):
        raise PimcError(f"--std: {','.join(map(str, prep['std']))} has a zero; the inputs would be divided by it")
    if scale is not None:
        prep["scale"] = scale
    if layout is not None:
        prep["layout"] = layout
    return prep


def _split_chip_opts(opts: dict, default_adc: str = "nonideal") -> dict:
    chip_opts = {k: opts.pop(k) for k in _CHIP_KEYS}
    if chip_opts.get("lut_csv") is not None:
        chip_opts["lut_csv"] = str(chip_opts["lut_csv"])
    if chip_opts.get("adc") is None:
        chip_opts["adc"] = default_adc
    return chip_opts


def _eval_setup(model: Path, opts: dict, plots: bool, command: str) -> tuple:
    """Pop the data, evaluation, chip and compile options of `pimc eval` / `pimc sweep`
    from ``opts``; return (data path, compile config, the other evaluate() arguments)."""
    from .core.config import build_config
    from .evaluate import _Progress
    from .executor import make_executor
    from .io import load_onnx
    from .pipeline import refuse_compiled
    from pimc.core.chip import build_chip_config

    refuse_compiled(load_onnx(model), str(model), command)

    e = {k: opts.pop(k) for k in ("data", "scale", "mean", "std", "layout", "batch_size", "split", "calib_from",
                                  "calib_split", "chips", "chip_preset", "calibrate_bn", "limit", "stats_images",
                                  "executor", "ray_address", "shards", "threads", "hw", "preset")}
    chip_opts = _split_chip_opts(opts)
    if e["chips"] < 0 or (e["limit"] is not None and e["limit"] < 1) or e["batch_size"] < 1 or e["stats_images"] < 0 \
            or e["shards"] < 0 or e["threads"] < 0:
        raise PimcError("--chips, --stats-images, --shards and --threads must be >= 0, --limit and --batch-size >= 1")
    if e["calibrate_bn"] and opts.get("fold_bn") is None:
        opts["fold_bn"] = "output"
    cfg = build_config(preset=e["preset"], hw=e["hw"], **opts)
    chip = build_chip_config(preset=e["chip_preset"], hw=e["hw"], **chip_opts)
    if plots:
        from .htmlreport import check_available
        check_available()
    log = lambda m: click.echo(m, err=True)
    ex = make_executor(e["executor"], threads=e["threads"], ray_address=e["ray_address"], shards=e["shards"],
                       progress_factory=lambda n, d: _Progress(n, d, log), log=log)
    kw = dict(chip=chip, chips=e["chips"], split=e["split"], calib_data=str(e["calib_from"]) if e["calib_from"] else None,
              calib_split=e["calib_split"], prep=_prep(model, e["scale"], e["mean"], e["std"], e["layout"]),
              limit=e["limit"], batch=e["batch_size"], calibrate_bn=e["calibrate_bn"], stats_images=e["stats_images"],
              executor=ex, log=log)
    return str(e["data"]), cfg, kw


def _check_outputs(**paths) -> None:
    """Check every output path of a command before any work (option name -> path)."""
    from .io import check_output_path
    for option, (path, kind) in paths.items():
        if path is not None:
            check_output_path(path, option, directory=kind == "dir", suffixes=(".png",) if kind == "png" else ())


def _write_json(obj: dict, path) -> None:
    if path:
        from .evaluate import write_report
        write_report(obj, path)
        click.echo(f"wrote {path}")


@cli.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@data_options
@eval_options
@chip_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path), help="Write an HTML report "
              "with PNG plots into this directory (index.html; needs pip install 'pimc[report]').")
@compile_options
def eval_cmd(model, json_path, html_dir, **opts):
    """Evaluate MODEL: float, digital quantized, ideal PIM and non-ideal PIM chips on the same images."""
    from .evaluate import evaluate, report_table

    _check_outputs(**{"--json": (json_path, "file"), "--html": (html_dir, "dir")})
    data, cfg, kw = _eval_setup(model, opts, plots=html_dir is not None, command="pimc eval")
    report = evaluate(str(model), data, cfg, **kw)
    click.echo(report_table(report))
    _write_json(report, json_path)
    if html_dir is not None:
        from .htmlreport import write_html
        write_html(report, html_dir)
        click.echo(f"wrote {html_dir / 'index.html'}")


@cli.command("calibrate-bn")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Split of the calibration images (keep the evaluation images out).")
@click.option("--images", type=int, default=256, show_default=True, help="Calibration images (a seeded random "
              "subset of the split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image subset.")
@click.option("--chip-preset", type=click.Choice(["pimqat-chip7", "ideal"]), help="Named chip.")
@chip_options
@click.option("--hw", "hw", type=click.Path(path_type=Path), help="Hardware TOML file ([nonideal] table).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The recalibrated PIM IR model (for this chip).")
def calibrate_bn_cmd(model, data, scale, mean, std, layout, batch_size, split, images, seed, chip_preset, hw,
                     output, **opts):
    """Re-estimate the BatchNorm statistics of MODEL (compiled with --fold-bn output) under one chip's
    non-ideal forward pass, layer by layer, on calibration images; no PyTorch."""
    import numpy as np

    from .bncal import calibrate_bn
    from .datasets import load_images, preprocess
    from .io import load_onnx, write_bytes_atomic
    from pimc.core.chip import build_chip_config

    if images < 1 or batch_size < 1:
        raise PimcError("--images and --batch-size must be >= 1")
    if output.resolve() == model.resolve():
        raise PimcError(f"-o: output '{output}' would overwrite the input model; choose another path")
    from .io import check_output_path
    check_output_path(output, "-o")
    chip = build_chip_config(preset=chip_preset, hw=hw, **_split_chip_opts(opts))
    proto = load_onnx(model)
    x_u8, _ = load_images(data, split)
    pick = np.sort(np.random.default_rng(seed).permutation(len(x_u8))[:images])
    x = preprocess(x_u8[pick], **_prep(model, scale, mean, std, layout))
    new, rec = calibrate_bn(proto, chip, x, batch=min(batch_size, 64), source=str(model),
                            log=lambda m: click.echo(m, err=True))
    write_bytes_atomic(new.SerializeToString(), output)
    worst = max(rec["layers"], key=lambda r: r["mean_shift_over_std"])
    click.echo(f"recalibrated {len(rec['layers'])} BatchNorms on {len(x)} images of '{data}' split {split}, "
               f"chip seed {chip.chip_seed}; largest mean shift {worst['mean_shift_over_std']:.3f} std "
               f"({worst['layer']})")
    click.echo(f"wrote {output}")


@cli.command("train")
@click.option("--module", required=True, metavar="FILE.py:FACTORY", help="The torch model: a Python file and a "
              "function in it returning the nn.Module (its Conv2d/Linear layers are matched to the mapping by weight name).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Its trained weights: a state_dict file (loaded with weights_only=True).")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training images (training and "
              "calibration): a CIFAR directory or .npz with splits (its train split) or an .npz with x, y.")
@click.option("--test-data", type=click.Path(path_type=Path), help="Evaluation images.  [default: the test split of --data]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The trained PIM IR (.onnx), compiled from the trained float model with the trained values.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the training images (fractions allowed).")
@click.option("--subset", type=int, help="Train on a seeded random subset of this many training images.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.005, show_default=True, help="SGD learning rate of weights, BN and biases (cosine decay).")
@click.option("--scale-lr", type=float, default=0.001, show_default=True, help="Learning rate of the learned input and "
              "weight-column scales (LSQ).")
@click.option("--adc-lr", type=float, default=0.0, show_default=True, help="Learning rate of the ADC steps, relative to "
              "their compiled values (SGD on step/step0; LSQ gradient). 0 keeps the compiled ADC ranges (and skips "
              "the step gradients: a faster step); on ResNet-20 3 helped differential and hurt native (README).")
@click.option("--rescale/--no-rescale", default=True, show_default=True, help="PIM-QAT's rescaling of the converted "
              "partial sums (rho = std(s)/std(ADC(s)); its running mean is folded into the output scale at export).")
@click.option("--train-adc-bits", type=int, help="Adjusted precision: train with ADCs of this many bits over the same "
              "ranges, deploy at --adc-bits.")
@click.option("--variability", help="Variability-aware training: a chip preset (see `pimc presets`) or a hardware "
              "TOML with a [nonideal] table; a new chip every --resample-every steps.")
@click.option("--resample-every", type=int, default=20, show_default=True, help="Steps between chips (with --variability).")
@click.option("--chips", type=int, default=0, show_default=True, help="After training: evaluate this many chips of "
              "--variability (BN-calibrated per chip), direct and trained.")
@click.option("--calib-images", type=int, default=512, show_default=True, help="Training images for calibration.")
@click.option("--eval-images", type=int, help="Evaluate on the first N test images.  [default: all]")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path), help="Training checkpoint "
              "(model, optimizer, RNG states), written every 200 steps.  [default: OUTPUT.state.pt]")
@click.option("--resume", is_flag=True, help="Continue from --state (the same options are required).")
@click.option("--train-seed", type=int, default=0, show_default=True, help="Seed of the subset, data order, augmentation and chips.")
@click.option("--threads", type=int, default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--no-augment", is_flag=True, help="No random flips and padded crops.")
@click.option("--scale", type=float, help="Preprocessing: x * scale ...  [default: 1/255]")
@click.option("--mean", help="... minus this per-channel mean (comma list) ...  [default: 0]")
@click.option("--std", help="... over this per-channel std (comma list).  [default: 1]")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="[default: NCHW]")
@compile_options
def train_cmd(module, checkpoint, data, test_data, output, json_path, epochs, subset, batch_size, lr, scale_lr, adc_lr, rescale,
              train_adc_bits, variability, resample_every, chips, calib_images, eval_images, state_path, resume,
              train_seed, threads, no_augment, scale, mean, std, layout, hw, preset, **opts):
    """PIM-QAT: retrain the torch module on the compiled mapping (same math as the IR, bit for bit) and export the
    trained PIM IR."""
    from .core.config import build_config
    from .core.chip import CHIP_PRESETS, build_chip_config
    try:
        import torch
    except ImportError:
        raise PimcError("pimc train needs PyTorch: pip install 'pimc[torch]'")
    from .train.command import run_train
    from .train.loop import TrainConfig

    state_path = state_path or output.with_name(output.name + ".state.pt")
    _check_outputs(**{"-o": (output, "file"), "--json": (json_path, "file"), "--state": (state_path, "file")})
    for name, v in (("--epochs", epochs), ("--lr", lr)):
        if v <= 0:
            raise PimcError(f"{name}: {v} is out of range; give a positive number")
    for name, v, lo in (("--batch-size", batch_size, 1), ("--scale-lr", scale_lr, 0), ("--adc-lr", adc_lr, 0), ("--calib-images", calib_images, 1),
                        ("--resample-every", resample_every, 1), ("--chips", chips, 0)):
        if v < lo:
            raise PimcError(f"{name}: {v} is out of range; give a value >= {lo}")
    if subset is not None and subset < batch_size:
        raise PimcError(f"--subset: {subset} is fewer than one batch (--batch-size {batch_size})")
    if opts.get("fold_bn") == "weights":
        raise PimcError("--fold-bn weights: training keeps BatchNorm after the arrays; use --fold-bn output (the default here)")
    cfg = build_config(preset=preset, hw=hw, **{**opts, "fold_bn": "output"})
    if not cfg.quantized:
        raise PimcError(f"--scheme {cfg.scheme}: nothing is quantized to train; pick a PIM scheme or digital")
    if train_adc_bits is not None and not cfg.pim:
        raise PimcError("--train-adc-bits needs a PIM scheme (an ADC)")
    chip = None
    if variability is not None:
        chip = (build_chip_config(preset=variability) if variability in CHIP_PRESETS
                else build_chip_config(hw=variability) if Path(variability).suffix == ".toml"
                else None)
        if chip is None:
            raise PimcError(f"--variability: '{variability}' is neither a chip preset ({', '.join(CHIP_PRESETS)}) "
                            f"nor a .toml hardware file")
    if threads:
        torch.set_num_threads(threads)
    prep = _prep(None, scale, mean, std, layout)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, scale_lr=scale_lr, adc_lr=adc_lr, augment=not no_augment,
                       seed=train_seed, resample_every=resample_every if chip is not None else 0)
    log = lambda m: click.echo(m, err=True)
    rep = run_train(module=module, checkpoint=checkpoint, data=data, test_data=test_data, output=output, json_path=json_path, config=cfg,
                    prep=prep, tcfg=tcfg, subset=subset, calib_images=calib_images, eval_images=eval_images,
                    rescale=rescale, train_adc_bits=train_adc_bits, chip=chip, chips=chips, state_path=state_path,
                    resume=resume, log=log)
    t = rep["top1"]
    click.echo(f"top-1 on {rep['test_images']} test images: direct deployment {100 * t['direct']:.2f} %, after PIM-QAT "
               f"{100 * t['trained']:.2f} % ({rep['steps']} steps, {rep['seconds']:.0f} s)")
    if "chips_bn_calibrated" in rep:
        c = rep["chips_bn_calibrated"]
        click.echo(f"{chips} chips, BN-calibrated: direct {100 * c['direct']['mean']:.2f} % (min {100 * c['direct']['min']:.2f}), "
                   f"trained {100 * c['trained']['mean']:.2f} % (min {100 * c['trained']['min']:.2f})")


@cli.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def compare_cmd(reports):
    """Side-by-side accuracies of `pimc eval` JSON REPORTS, with deltas against the first."""
    from .compare import compare_reports, load_report
    click.echo(compare_reports([load_report(p) for p in reports], [str(p) for p in reports]))


@cli.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@data_options
@eval_options
@chip_options
@click.option("--schemes", default="native,differential,bit-serial", show_default=True,
              help="Comma list of PIM schemes.")
@click.option("--adc-bits-list", "adc_bits_list", default="3,4,5,6,7,8", show_default=True,
              help="Comma list of ADC resolutions.")
@click.option("--grid", "grid", multiple=True, help="More axes: KEY=V1,V2 over compile options (e.g. "
              "weight_bits=4,8 or array_rows=64,128); repeatable.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write all points as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG: accuracy against ADC bits per scheme (needs pip install 'pimc[report]').")
@compile_options
def sweep_cmd(model, schemes, adc_bits_list, grid, json_path, plot_path, **opts):
    """Evaluate MODEL over a grid: schemes x ADC bits x --grid axes (float and digital once per quantization)."""
    from .sweep import parse_grid, sweep, sweep_table, write_sweep_plot

    if opts.get("scheme") is not None or opts.get("adc_bits") is not None:
        raise PimcError("pimc sweep takes --schemes and --adc-bits-list, not --scheme/--adc-bits")
    axes = parse_grid(schemes, adc_bits_list, grid)
    _check_outputs(**{"--json": (json_path, "file"), "--plot": (plot_path, "png")})
    data, cfg, kw = _eval_setup(model, opts, plots=plot_path is not None, command="pimc sweep")
    result = sweep(str(model), data, cfg, axes, **kw)
    click.echo(sweep_table(result))
    _write_json(result, json_path)
    if plot_path is not None:
        write_sweep_plot(result, plot_path)
        click.echo(f"wrote {plot_path}")


@cli.command("native")
@click.option("--fetch-headers", is_flag=True, help="Download Debian's libonnxruntime-dev into pimc's cache "
              "(private apt configuration; system sources untouched) for the headers.")
@click.option("--rebuild", is_flag=True, help="Rebuild the library even if a cached build exists.")
def native_cmd(fetch_headers, rebuild):
    """Build the native kernel library (and say where it is and which headers it used)."""
    from pimc.runtime import native
    if fetch_headers:
        native.fetch_headers()
    lib = native.build(force=rebuild)
    import onnxruntime
    inc = native.find_headers()
    header_api, runtime_api = native.api_versions(inc)
    click.echo(f"headers: {inc} (onnxruntime C API version {header_api if header_api is not None else 'unknown'})")
    click.echo(f"library: {lib}")
    click.echo(f"integer products of the fused array ops: {native.isa(lib)}")
    if header_api is None:
        click.echo("api: the headers' C API version could not be read")
    elif header_api <= runtime_api:
        click.echo(f"api: built against C API {header_api}; the installed onnxruntime {onnxruntime.__version__} serves "
                   f"C API 1..{runtime_api}, so this is supported (the C API is versioned and backward compatible)")
    else:
        raise PimcError(f"the headers' C API version {header_api} is newer than the installed onnxruntime "
                        f"{onnxruntime.__version__} serves ({runtime_api}); upgrade onnxruntime or use older headers "
                        f"(PIMC_ORT_INCLUDE)")


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="pimc", standalone_mode=False)
        return 0
    except PimcError as e:
        _err(str(e))
        return 2
    except click.exceptions.Abort:
        _err("aborted")
        return 130
    except click.UsageError as e:
        hint = f" (see 'pimc {e.ctx.command.name} --help')" if e.ctx is not None and e.ctx.command.name != "cli" else " (see 'pimc --help')"
        _err(" ".join(e.format_message().split()) + hint)
        return 2
    except click.ClickException as e:
        _err(" ".join(e.format_message().split()))
        return e.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:   # running out of memory is a one-line error too; anything else is a bug: traceback
        if not _out_of_memory(e):
            raise
        first = (str(e).splitlines() or [""])[0].strip()
        _err(f"out of memory{f' ({first[:160]})' if first else ''}; lower the need: fewer calibration samples "
             f"(--calib-samples), a smaller --chunk-mib or a smaller --batch-size")
        return 2


# onnxruntime reports a failed allocation as its own exception types, with these messages
_OOM_MESSAGES = ("failed to allocate memory", "bad_alloc", "bad allocation", "std::bad_alloc")


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return any(m in msg for m in _OOM_MESSAGES)


if __name__ == "__main__":
    sys.exit(main())


def console_main() -> None:
    sys.exit(main())
