"""Chip draws are a pure function of (chip, layer, sizes); instantiate writes exactly them."""
import numpy as np
import onnx
from onnx import numpy_helper

import pimc
from pimc.core import names as N
from pimc.demo import embedded_files
from pimc.core.chip import build_chip_config, draw_layer
from pimc.core.mapping import read_mapping
from pimc.runtime.chip import instantiate
def _bit_serial_digits(**kw):
    """The embedded digits CNN, bit-serial W4A4 with 1-bit cells and a 5-bit ADC, calibrated in memory."""
    model, data = embedded_files()
    return pimc.compile_model(model, scheme="bit-serial", cell_bits=1, weight_bits=4, input_bits=4, adc_bits=5,
                              calib_inputs=np.load(data)["x_calib"], **kw)


def test_draws_are_pure_and_instantiate_writes_them():
    res = _bit_serial_digits()
    mapping = read_mapping(res.model)
    chip = build_chip_config(preset="pimqat-chip7", chip_seed=11, device_sigma_cell=0.02, device_sigma_chip=0.01)
    chipped = instantiate(res.model, chip)
    inits = {t.name: numpy_helper.to_array(t) for t in chipped.graph.initializer}
    base = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    seeds = {n.name: next(a.i for a in n.attribute if a.name == "seed") for n in chipped.graph.node
             if n.op_type in ("AdcQuantizeNonIdeal", "AdcRecombineNonIdeal")}
    for li, L in enumerate(mapping.layers):
        chunks = L.chunk_list
        args = (chip, li, L.adc.columns, (L.tiling.channels_per_tile, *L.kernel), len(chunks))
        a, b = draw_layer(*args), draw_layer(*args)
        assert np.array_equal(a.gain, b.gain) and np.array_equal(a.offset, b.offset)
        assert np.array_equal(a.log_factor, b.log_factor) and a.noise_seeds == b.noise_seeds
        assert not np.array_equal(a.gain, draw_layer(build_chip_config(preset="pimqat-chip7", chip_seed=12),
                                                     *args[1:]).gain)
        for ci, chunk in enumerate(chunks):
            sfx, cols = chunk.suffix, L.chunk_columns(chunk)
            assert np.array_equal(inits[N.tensor(L.name, N.CHIP_GAIN, sfx)].reshape(-1), a.gain[cols])
            assert np.array_equal(inits[N.tensor(L.name, N.CHIP_OFFSET, sfx)].reshape(-1), a.offset[cols])
            assert seeds[N.node(L.name, N.ADC, sfx)] == a.noise_seeds[ci]
            w0 = base[N.tensor(L.name, N.ARRAY_WEIGHT, sfx)].astype(np.float64)
            w1 = inits[N.tensor(L.name, N.ARRAY_WEIGHT, sfx)]
            assert np.array_equal(w1, (w0 * np.exp(a.log_factor[cols][:, :w0.shape[1]])).astype(np.float32))


def test_the_typed_mapping_is_the_record_and_old_irs_are_refused(tmp_path, capsys):
    import json

    import onnx

    from pimc.cli import main
    from pimc.core.mapping import CompiledMapping
    model, data = embedded_files()
    np.save(tmp_path / "calib.npy", np.load(data)["x_calib"])
    res = pimc.compile_model(model, scheme="differential", fold_bn="output", calib_data=str(tmp_path / "calib.npy"))
    rec = json.loads(json.dumps(res.mapping))
    typed = read_mapping(res.model)
    assert typed.to_record() == rec and CompiledMapping.from_record(rec) == typed
    assert typed.layers[0].adc.columns == rec["layers"][0]["adc"]["columns"]
    # an IR written before the typed mapping (no pimc.ir_version) gets one line: recompile
    old = onnx.ModelProto()
    old.CopyFrom(res.model)
    keep = [p for p in old.metadata_props if p.key != "pimc.ir_version"]
    del old.metadata_props[:]
    old.metadata_props.extend(keep)
    onnx.save(old, tmp_path / "old.pim.onnx")
    np.save(tmp_path / "x.npy", np.load(data)["x_test"][:3])
    assert main(["run", str(tmp_path / "old.pim.onnx"), "--input", str(tmp_path / "x.npy"), "--adc", "nonideal"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older pimc (IR version 1" in err[0] and "recompile" in err[0]


def test_the_mapping_holds_adc_steps_and_the_ir_names():
    res = _bit_serial_digits()
    m = read_mapping(res.model)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    nodes = {n.name for n in res.model.graph.node}
    outputs = {o for n in res.model.graph.node for o in n.output}
    for L in m.layers:
        for ci, chunk in enumerate(L.chunk_list):
            cols = L.chunk_columns(chunk)
            assert np.array_equal(inits[L.tensors["adc_scale"][ci]].reshape(-1), np.float32(L.adc.step)[cols])
            assert np.array_equal(inits[L.tensors["adc_zero_point"][ci]].reshape(-1), np.float32(L.adc.zero_point)[cols])
            assert L.tensors["array_weight"][ci] in inits and L.tensors["array_mac"][ci] in outputs
            assert L.tensors["adc"][ci] in nodes
        assert L.tensors["out_scale"] in inits and L.tensors["dequantize"] in nodes
        assert L.source_initializers["weight"] in {t.name for t in onnx.load(embedded_files()[0]).graph.initializer}
