"""`python -m keras_cwsn.export RUN --format litert|onnx|openvino`: each file gives the Keras classifier's
probabilities on the same uint8 images (the preprocessing is inside), run by that format's own runtime.

LiteRT runs in TensorFlow's interpreter; ONNX in onnxruntime and OpenVINO in its runtime, each where its
packages are installed (skipped, with the reason, where not). A missing converter is one line naming it.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: the exporters convert a TensorFlow graph")

from conftest import uv_stats_reference, yuv_reference  # noqa: E402
from keras_cwsn import data as data_lib  # noqa: E402
from keras_cwsn import export, export_formats  # noqa: E402

TOLERANCE = 1e-5  # float32 arithmetic in another runtime: probabilities agree to this, absolutely


@pytest.fixture(scope="module")
def run(protocol_run):
    config = protocol_run["config"]
    evaluation = data_lib.load_split("synthetic", config["eval_split"], synthetic=config["synthetic"])
    train = data_lib.load_split("synthetic", "train", synthetic=config["synthetic"])
    images = evaluation.images[:16]
    x = yuv_reference(images, *uv_stats_reference(train.images)).astype(np.float32)
    expected = protocol_run["export"]["classifier"](x, training=False)["probabilities"].numpy()
    return dict(dir=protocol_run["dir"], images=np.asarray(images, np.uint8), expected=expected,
                class_names=protocol_run["metrics"]["class_names"])


def _export(run, fmt, tmp_path, capsys):
    path = str(tmp_path / f"model{export_formats.FORMATS[fmt][0]}")
    assert export.main([run["dir"], "--format", fmt, "--output", path]) == 0, capsys.readouterr().err
    with open(path + ".json") as f:
        info = json.load(f)
    assert info["class_names"] == run["class_names"] and info["image_size"] == [32, 32]
    assert info["inputs"] == {"images": "uint8 (batch, H, W, 3) RGB at image_size"}
    return path


def _error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m keras_cwsn.export: error: "), lines
    return lines[0]


def _needs(*packages):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)}")


def test_litert_file_gives_the_classifiers_probabilities(run, tmp_path, capsys):
    path = _export(run, "litert", tmp_path, capsys)
    interpreter = tf.lite.Interpreter(model_path=path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape"][1:]) == [32, 32, 3]
    probabilities = []
    for image in run["images"]:  # LiteRT's signature has batch 1
        interpreter.resize_tensor_input(inp["index"], [1, 32, 32, 3])
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        probabilities.append(interpreter.get_tensor(out["index"])[0])
    np.testing.assert_allclose(np.stack(probabilities), run["expected"], atol=TOLERANCE)


def test_onnx_file_gives_the_classifiers_probabilities(run, tmp_path, capsys):
    _needs("tf2onnx", "onnx", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(_export(run, "onnx", tmp_path, capsys))
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)"
    (probabilities,) = session.run(None, {inp.name: run["images"]})
    np.testing.assert_allclose(probabilities, run["expected"], atol=TOLERANCE)
    with pytest.raises(Exception, match="uint8"):  # the contract, said by the runtime itself
        session.run(None, {inp.name: run["images"].astype(np.float32)})


def test_openvino_file_gives_the_classifiers_probabilities(run, tmp_path, capsys):
    _needs("openvino")
    import openvino

    path = _export(run, "openvino", tmp_path, capsys)
    assert os.path.exists(path[:-len(".xml")] + ".bin")
    compiled = openvino.Core().compile_model(path, "CPU")
    probabilities = compiled(run["images"])[0]
    np.testing.assert_allclose(probabilities, run["expected"], atol=TOLERANCE)


def test_a_missing_converter_is_one_line_naming_the_package(run, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    assert export.main([run["dir"], "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    line = _error_line(capsys)
    assert "--format onnx needs the package(s) tf2onnx" in line and "pip install tf2onnx" in line, line
    assert not os.listdir(tmp_path)


def test_an_unknown_format_is_one_line(run, capsys):
    assert export.main([run["dir"], "--format", "pytorch"]) == 2
    line = _error_line(capsys)
    assert "invalid choice: 'pytorch'" in line and "litert" in line, line
