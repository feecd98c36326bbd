"""fxpress.save / fxpress.load: every compression kind round-trips (identical outputs on a new batch
size, the very same tensors and qparams, the same ops, the reports), unsafe archives are refused,
other format versions are a clear error, weights alone go through safetensors."""

import io
import json
import pickle
import zipfile
from collections import Counter

import pytest
import torch

import fxpress
from fxpress.ir.graph import op_name
from fxpress.serialize import FORMAT_VERSION, FormatVersionError, UnsafeFileError, _weights, read_metadata


@pytest.fixture(scope="module")
def compressed(digits):
    model, inputs, calibration, *_ = digits
    return {
        "int8_static": fxpress.quantize(model, inputs, calibration=calibration[:2], progress=False),
        "int8_dynamic": fxpress.quantize(model, inputs, config="int8_dynamic", progress=False),
        "int4_weight_only": fxpress.quantize(model, inputs, config="int4_weight_only", progress=False),
        "pruned": fxpress.prune(model, inputs, 0.5, round_to=8),
        "decomposed": fxpress.decompose(model, inputs, rank=0.5),
        "sparse_2of4": fxpress.sparsify(model, inputs, pattern="2:4"),
    }


def _ops(gm):
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


REPORTS = {
    "int8_static": fxpress.quant_report,
    "int8_dynamic": fxpress.quant_report,
    "int4_weight_only": fxpress.quant_report,
    "pruned": fxpress.prune_report,
    "decomposed": fxpress.decompose_report,
    "sparse_2of4": fxpress.sparsity_report,
}


@pytest.mark.parametrize("kind", list(REPORTS))
def test_round_trip_keeps_outputs_tensors_structure_and_reports(kind, compressed, digits, tmp_path):
    gm = compressed[kind]
    x = digits[4][:5]  # batch 5: the saved graph keeps its dynamic batch
    path = fxpress.save(gm, tmp_path / "m.pt2")
    loaded = fxpress.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    ours, theirs = _weights(gm), _weights(loaded)
    assert set(ours) == set(theirs)
    for name, t in ours.items():  # integer weights, scales, zero points, pruned/decomposed shapes
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name
    assert _ops(loaded) == _ops(gm)
    report = REPORTS[kind]
    assert str(report(loaded)) == str(report(gm))
    loaded.train()  # fxpress graphs switch mode after loading too
    loaded.eval()
    doc = read_metadata(path)
    assert doc["format_version"] == FORMAT_VERSION and doc["fxpress_version"] == fxpress.__version__
    assert doc["torch_version"] == torch.__version__


def test_same_qparams_after_loading(compressed, tmp_path):
    gm = compressed["int8_static"]
    loaded = fxpress.load(fxpress.save(gm, tmp_path / "q.pt2"))
    qparams = {n: t for n, t in _weights(gm).items() if n.endswith(("_scale", "_zero_point"))}
    assert qparams  # per-channel weight qparams
    for name, t in qparams.items():
        assert torch.equal(_weights(loaded)[name], t)

    def activation_qparams(g):
        return [tuple(a for a in n.args[1:] if not isinstance(a, torch.fx.Node)) for n in g.graph.nodes
                if n.op == "call_function" and "quantize_per_tensor" in str(n.target)]

    assert activation_qparams(loaded) == activation_qparams(gm)  # scale/zero point literals in the graph
    assert fxpress.quant_report(loaded).quantized("conv") == 4


def test_loaded_graphs_compose_with_the_rest_of_fxpress(compressed, digits, tmp_path):
    model, inputs, *_ = digits
    loaded = fxpress.load(fxpress.save(compressed["pruned"], tmp_path / "p.pt2"))
    quantized = fxpress.quantize(loaded, inputs, config="int8_dynamic", progress=False)  # a loaded graph is a graph
    assert fxpress.quant_report(quantized).quantized("linear") == 1
    exported = fxpress.export_onnx(loaded, inputs, tmp_path / "p.onnx")
    assert exported.path.stat().st_size > 0


def test_an_eager_module_is_captured_and_saved(digits, tmp_path):
    model, inputs, *_ = digits
    with pytest.raises(ValueError, match="needs example_inputs"):
        fxpress.save(model, tmp_path / "m.pt2")
    loaded = fxpress.load(fxpress.save(model, tmp_path / "m.pt2", example_inputs=inputs))
    x = digits[4][:3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="ending in .pt2"):
        fxpress.save(model, tmp_path / "m.pt", example_inputs=inputs)


# ---------------------------------------------------------------------------------------------
# archives fxpress must refuse


def _rewrite(src, dst, change):
    """Copy a .pt2 zip, letting ``change(name, data) -> data or None (drop)`` edit entries; ``change`` may add entries
    by returning a dict for the key None."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (change(None, None) or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def saved(compressed, tmp_path_factory):
    return fxpress.save(compressed["int8_dynamic"], tmp_path_factory.mktemp("saved") / "model.pt2")


@pytest.mark.parametrize(
    "version, wrote, words, not_words",
    [
        # a newer format from this very fxpress version (or one that does not parse): no "upgrade to 0.1.0"
        (FORMAT_VERSION + 1, None, f"The file is newer: upgrade to an fxpress that reads format version {FORMAT_VERSION + 1} to load it.", "or later"),
        (FORMAT_VERSION + 1, "dev", "upgrade to an fxpress that reads format version", "or later"),
        (FORMAT_VERSION + 1, "99.0.0", "The file is newer: upgrade to fxpress 99.0.0 or later to load it.", "older"),
        (0, None, "The file is older: load it with the fxpress that wrote it and save it again with this version", "upgrade"),
        (0, "0.0.1", "The file is older: load it with fxpress 0.0.1 and save it again with this version", "upgrade"),
    ],
    ids=["newer-same-release", "newer-unparsed", "newer-release", "older-same-release", "older-release"],
)
def test_other_format_versions_are_clear_errors(saved, tmp_path, version, wrote, words, not_words):
    def change(name, data):
        if name and name.endswith("extra/fxpress.json"):
            doc = json.loads(data)
            doc["format_version"] = version
            if wrote is not None:
                doc["fxpress_version"] = wrote
            return json.dumps(doc)
        return data

    bad = _rewrite(saved, tmp_path / "other.pt2", change)
    with pytest.raises(FormatVersionError) as info:
        fxpress.load(bad)
    text = str(info.value)
    by = wrote or fxpress.__version__
    assert (f"is in fxpress model format version {version} (written by fxpress {by}); "
            f"this fxpress ({fxpress.__version__}) reads format version {FORMAT_VERSION}. ") in text
    message = text.split(str(bad), 1)[1]  # not the temporary path's words
    assert words in message and not_words not in message.lower()


_UNPICKLED = []


class _Marker:
    def __reduce__(self):
        return (_UNPICKLED.append, ("unpickled!",))


@pytest.mark.parametrize(
    "attack, message",
    [
        ("extra_file", "holds files fxpress never writes"),
        ("pickled_weight", "is stored with pickle"),
        ("pickled_sample_inputs", "do not load as plain tensors"),
    ],
)
def test_archives_that_would_unpickle_are_refused(saved, tmp_path, attack, message):
    def change(name, data):
        if name is None:
            return {"model/data/weights/evil.pkl": pickle.dumps(_Marker())} if attack == "extra_file" else None
        if attack == "pickled_weight" and name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"]))
            doc["config"][first]["use_pickle"] = True
            return json.dumps(doc)
        if attack == "pickled_sample_inputs" and name.endswith("sample_inputs/model.pt"):
            buf = io.BytesIO()
            torch.save(((_Marker(),), {}), buf)
            return buf.getvalue()
        return data

    bad = _rewrite(saved, tmp_path / "bad.pt2", change)
    with pytest.raises(UnsafeFileError, match=message) as info:
        fxpress.load(bad)
    assert "trusted=True" in str(info.value)
    assert not _UNPICKLED  # refused before anything was unpickled


def test_not_an_fxpress_archive(digits, tmp_path):
    model, inputs, *_ = digits
    ep = torch.export.export(model, (digits[4][:2],))
    torch.export.save(ep, tmp_path / "plain.pt2")
    with pytest.raises(ValueError, match="not written by fxpress.save"):
        fxpress.load(tmp_path / "plain.pt2")
    (tmp_path / "junk.pt2").write_text("not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        fxpress.load(tmp_path / "junk.pt2")
    with pytest.raises(FileNotFoundError):
        fxpress.load(tmp_path / "missing.pt2")


def test_trusted_loading_skips_the_audit(saved, digits):
    loaded = fxpress.load(saved, trusted=True)
    assert fxpress.quant_report(loaded).quantized("linear") == 1


# ---------------------------------------------------------------------------------------------
# weights alone


def test_weights_round_trip_through_safetensors(compressed, tmp_path):
    gm = compressed["int8_static"]
    path = fxpress.save_weights(gm, tmp_path / "w.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON (no pickle)
    loaded = fxpress.load(fxpress.save(gm, tmp_path / "q.pt2"))
    with torch.no_grad():
        for t in _weights(loaded).values():
            t.zero_()
    fxpress.load_weights(loaded, path)
    for name, t in _weights(gm).items():
        assert torch.equal(_weights(loaded)[name], t), name
    with pytest.raises(ValueError, match="does not match the model's tensors|in the file but"):
        fxpress.load_weights(compressed["pruned"], path)
