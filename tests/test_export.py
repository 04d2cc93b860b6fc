"""Tests for keras_cwsn.export: the exported SavedModel serves what the Keras classifier predicts.

The tiny run of the whole protocol is conftest's session-wide `protocol_run` (shared with
test_train_e2e.py), which captures the in-memory Keras classifier that `training.run` exports. The
SavedModel is loaded in a fresh Python process with `tf.saved_model.load` alone, and its outputs are
compared with that classifier fed by the NumPy BT.601 reference preprocessing (conftest), with U, V
statistics computed here from the training split: nothing on the reference side comes from the
SavedModel or from the preprocessing code inside it.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: the SavedModel export")

from conftest import subprocess_env, uv_stats_reference, yuv_reference  # noqa: E402
from keras_cwsn import data as data_lib  # noqa: E402
from keras_cwsn import export as export_lib  # noqa: E402
from keras_cwsn.constants import MODEL_INFO_ASSET  # noqa: E402

# Runs in a fresh interpreter: TensorFlow only, no keras_cwsn. Calls every case in order (the
# error cases sit between good calls: the process must go on serving after them).
SERVE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf

    model_dir, case_dir = sys.argv[1], sys.argv[2]
    with open(os.path.join(case_dir, "cases.json")) as f:
        cases = json.load(f)
    loaded = tf.saved_model.load(model_dir)
    report = {"signatures": sorted(loaded.signatures), "cases": {}}
    arrays = {}
    for case in cases:
        fn = loaded.signatures[case["signature"]]
        if case["signature"] == "serving_default":
            inputs = {"images": tf.constant(np.load(os.path.join(case_dir, case["input"])))}
        else:
            items = []
            for name in case["input"]:
                with open(os.path.join(case_dir, name), "rb") as f:
                    items.append(f.read())
            inputs = {"image_bytes": tf.constant(items, tf.string)}
        try:
            outputs = fn(**inputs)
        except tf.errors.InvalidArgumentError as e:
            report["cases"][case["name"]] = {"error": type(e).__name__, "message": e.message}
            continue
        report["cases"][case["name"]] = {"shapes": {k: list(v.shape) for k, v in outputs.items()}}
        for key, value in outputs.items():
            arrays[case["name"] + "." + key] = value.numpy().astype(str) if value.dtype == tf.string else value.numpy()
    report["keras_cwsn_imported"] = sorted(m for m in sys.modules if m.startswith("keras_cwsn"))
    np.savez(os.path.join(case_dir, "outputs.npz"), **arrays)
    with open(os.path.join(case_dir, "report.json"), "w") as f:
        json.dump(report, f)
""")


@pytest.fixture(scope="module")
def run(protocol_run):
    """The shared run: its folder, figures, the classifier `training.run` exported, and the evaluation images."""
    config = protocol_run["config"]
    evaluation = data_lib.load_split("synthetic", config["eval_split"], synthetic=config["synthetic"])
    train = data_lib.load_split("synthetic", "train", synthetic=config["synthetic"])
    return dict(protocol_run["export"], dir=protocol_run["dir"], model_dir=protocol_run["model_dir"],
                results=protocol_run["metrics"], config=config, eval_images=evaluation.images,
                eval_labels=evaluation.labels, uv_stats=uv_stats_reference(train.images))


def _keras_probabilities(run, images):
    """The in-memory classifier on the reference preprocessing of uint8-range RGB images."""
    x = yuv_reference(images, *run["uv_stats"]).astype(np.float32)
    return run["classifier"](x, training=False)["probabilities"].numpy()


def _resize(images, size):
    """What the folder pipeline does to an image of another size: bilinear, antialiased, rounded to uint8 range."""
    resized = tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear", antialias=True)
    return tf.round(tf.clip_by_value(resized, 0, 255)).numpy()


def _png(array):
    return tf.io.encode_png(array).numpy()


def _webp_rgba(array):
    """A lossless WebP with alpha (TensorFlow encodes no WebP; Pillow does)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA").save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    """Every case run through the SavedModel in a fresh process: (report, outputs, inputs)."""
    case_dir = str(tmp_path_factory.mktemp("serve_cases"))
    rng = np.random.default_rng(0)
    images = run["eval_images"]
    inputs = {
        "eval": images,
        "big": rng.integers(0, 256, (3, 48, 40, 3), dtype=np.uint8),
        "grey": images[:4, :, :, :1],
        "rgba": np.concatenate([images[:4], rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)], axis=-1),
        "two_channels": images[:2, :, :, :2],
        "five_channels": np.concatenate([images[:2], images[:2, :, :, :2]], axis=-1),
        "empty": np.zeros((0, 32, 32, 3), np.uint8),
    }
    files = {}
    for i, image in enumerate(images[:16]):
        files[f"eval_{i}.png"] = _png(image)
    files["grey.png"] = _png(images[0, :, :, :1])
    files["rgba.png"] = _png(np.concatenate([images[0], np.full((32, 32, 1), 128, np.uint8)], axis=-1))
    files["big.png"] = _png(inputs["big"][0])
    files["rgba.webp"] = _webp_rgba(np.concatenate([images[1], np.full((32, 32, 1), 200, np.uint8)], axis=-1))
    files["not_an_image.png"] = b"this is not an image"
    files["truncated.png"] = _png(images[1])[:60]
    files["empty.bin"] = b""
    for name, data in files.items():
        with open(os.path.join(case_dir, name), "wb") as f:
            f.write(data)
    cases = []
    for name, array in inputs.items():
        np.save(os.path.join(case_dir, f"{name}.npy"), array)
        cases.append({"name": f"images_{name}", "signature": "serving_default", "input": f"{name}.npy"})
    eval_pngs = [f"eval_{i}.png" for i in range(16)]
    cases += [
        {"name": "bytes_eval", "signature": "serve_jpeg", "input": eval_pngs},
        {"name": "bytes_corrupt", "signature": "serve_jpeg", "input": ["eval_0.png", "not_an_image.png"]},
        {"name": "bytes_truncated", "signature": "serve_jpeg", "input": ["truncated.png"]},
        {"name": "bytes_empty_string", "signature": "serve_jpeg", "input": ["empty.bin"]},
        {"name": "bytes_channels", "signature": "serve_jpeg", "input": ["grey.png", "rgba.png", "big.png", "rgba.webp"]},
        {"name": "bytes_empty", "signature": "serve_jpeg", "input": []},
        {"name": "bytes_after_errors", "signature": "serve_jpeg", "input": eval_pngs[:2]},
    ]
    with open(os.path.join(case_dir, "cases.json"), "w") as f:
        json.dump(cases, f)
    with open(os.path.join(case_dir, "serve.py"), "w") as f:
        f.write(SERVE_SCRIPT)
    proc = subprocess.run([sys.executable, os.path.join(case_dir, "serve.py"), run["model_dir"], case_dir],
                          capture_output=True, text=True, timeout=300, cwd=case_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(case_dir, "report.json")) as f:
        report = json.load(f)
    outputs = dict(np.load(os.path.join(case_dir, "outputs.npz")))
    return report, outputs, inputs


def test_training_run_exports_with_the_documented_arguments(run):
    names = list(data_lib.dataset_info("synthetic").fine_names)
    assert run["class_names"] == names == run["results"]["class_names"]
    assert run["image_size"] == (32, 32)
    # the training split's U, V statistics go into the SavedModel (6 decimals)
    assert run["stats"]["normalization"] == "yuv"
    np.testing.assert_allclose(run["stats"]["uv_mean"], run["uv_stats"][0], atol=1e-6)
    np.testing.assert_allclose(run["stats"]["uv_std"], run["uv_stats"][1], atol=1e-6)
    assert run["kwargs"]["metadata"]["dataset"] == "synthetic"
    assert sorted(os.listdir(run["model_dir"])) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert not os.path.exists(run["model_dir"] + ".tmp")


def test_fingerprint_is_written(run):
    fingerprint = tf.saved_model.experimental.read_fingerprint(run["model_dir"])
    assert fingerprint.saved_model_checksum != 0


def test_model_info_asset_is_present_and_registered(run):
    with open(os.path.join(run["model_dir"], "assets", MODEL_INFO_ASSET)) as f:
        info = json.load(f)
    assert info["class_names"] == run["class_names"]
    assert info["dataset"] == "synthetic" and info["variant"] == "D"
    assert info["figures"]["classification_accuracy"] == run["results"]["classification_accuracy"]
    assert info["image_size"] == [32, 32] and info["top_k"] == 5
    assert info["preprocessing"]["normalization"] == "yuv"
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(run["model_dir"], "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    assert [a.filename for a in saved_model.meta_graphs[0].asset_file_def] == [MODEL_INFO_ASSET]


def test_fresh_process_sees_both_signatures_without_keras_cwsn(served):
    report, _, _ = served
    assert set(export_lib.SIGNATURES) <= set(report["signatures"])
    assert report["keras_cwsn_imported"] == []


def test_serving_default_agrees_with_keras(run, served):
    _, outputs, inputs = served
    expected = _keras_probabilities(run, inputs["eval"])
    np.testing.assert_allclose(outputs["images_eval.probabilities"], expected, atol=1e-5)
    ids = outputs["images_eval.class_ids"]
    np.testing.assert_array_equal(ids, np.argmax(expected, axis=-1))
    np.testing.assert_array_equal(outputs["images_eval.class_names"], np.array(run["class_names"])[ids])
    # The SavedModel reproduces the run's own accuracy (to one near-tie).
    accuracy = np.mean(ids == run["eval_labels"])
    assert abs(accuracy - run["results"]["classification_accuracy"]) <= 1 / len(ids) + 1e-9


def test_top_k_outputs(run, served):
    _, outputs, _ = served
    probabilities = outputs["images_eval.probabilities"]
    assert outputs["images_eval.top_k_ids"].shape == (len(probabilities), 5)
    np.testing.assert_allclose(outputs["images_eval.top_k_scores"], -np.sort(-probabilities, axis=-1)[:, :5], atol=1e-7)
    np.testing.assert_array_equal(outputs["images_eval.top_k_ids"][:, 0], outputs["images_eval.class_ids"])
    np.testing.assert_array_equal(outputs["images_eval.top_k_names"],
                                  np.array(run["class_names"])[outputs["images_eval.top_k_ids"]])


def test_serve_jpeg_agrees_with_keras_on_png(run, served):
    _, outputs, inputs = served
    expected = _keras_probabilities(run, inputs["eval"][:16])
    np.testing.assert_allclose(outputs["bytes_eval.probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["bytes_eval.class_names"], outputs["images_eval.class_names"][:16])
    np.testing.assert_allclose(outputs["bytes_after_errors.probabilities"], expected[:2], atol=1e-5)


def test_other_sizes_are_resized_as_the_folder_pipeline_does(run, served):
    _, outputs, inputs = served
    expected = _keras_probabilities(run, _resize(inputs["big"], (32, 32)))
    np.testing.assert_allclose(outputs["images_big.probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs["bytes_channels.probabilities"][2], expected[0], atol=1e-5)


def test_grey_and_rgba_images_are_converted(run, served):
    _, outputs, inputs = served
    grey = np.repeat(inputs["grey"], 3, axis=-1)
    np.testing.assert_allclose(outputs["images_grey.probabilities"], _keras_probabilities(run, grey), atol=1e-5)
    rgba = inputs["rgba"][..., :3]
    np.testing.assert_allclose(outputs["images_rgba.probabilities"], _keras_probabilities(run, rgba), atol=1e-5)
    np.testing.assert_allclose(outputs["bytes_channels.probabilities"][0], _keras_probabilities(run, grey[:1])[0],
                               atol=1e-5)
    np.testing.assert_allclose(outputs["bytes_channels.probabilities"][1],
                               _keras_probabilities(run, inputs["eval"][:1])[0], atol=1e-5)
    np.testing.assert_allclose(outputs["bytes_channels.probabilities"][3],  # a WebP with alpha
                               _keras_probabilities(run, inputs["eval"][1:2])[0], atol=1e-5)


@pytest.mark.parametrize("case, channels", [("images_two_channels", 2), ("images_five_channels", 5)])
def test_other_channel_counts_are_refused(served, case, channels):
    report, _, _ = served
    result = report["cases"][case]
    assert result["error"] == "InvalidArgumentError"
    assert f"Received {channels} channels" in result["message"]


def test_undecodable_bytes_get_a_clear_error(served):
    report, _, _ = served
    corrupt = report["cases"]["bytes_corrupt"]
    assert corrupt["error"] == "InvalidArgumentError"
    assert "could not decode image 1 of the batch of 2" in corrupt["message"]
    assert "could not decode image 0 of the batch of 1 (0 bytes)" in report["cases"]["bytes_empty_string"]["message"]
    truncated = report["cases"]["bytes_truncated"]
    assert truncated["error"] == "InvalidArgumentError" and "Invalid PNG data" in truncated["message"]
    assert "shapes" in report["cases"]["bytes_after_errors"]  # the process goes on serving


@pytest.mark.parametrize("case", ["images_empty", "bytes_empty"])
def test_empty_batch_returns_empty_outputs(served, case):
    report, _, _ = served
    shapes = report["cases"][case]["shapes"]
    assert shapes == {"probabilities": [0, 9], "class_ids": [0], "class_names": [0], "top_k_ids": [0, 5],
                      "top_k_scores": [0, 5], "top_k_names": [0, 5]}


def _saved_model_cli(model_dir):
    command = shutil.which("saved_model_cli")
    command = [command] if command else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run([*command, "show", "--all", "--dir", model_dir], capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _signature_block(text, name):
    match = re.search(rf"signature_def\['{name}'\]:\n(.*?)Method name is", text, re.S)
    assert match, f"no signature {name!r} in:\n{text}"
    return match.group(1)


def test_saved_model_cli_lists_documented_signatures(run):
    text = _saved_model_cli(run["model_dir"])
    expected_inputs = {"serving_default": ("images", "DT_UINT8", "(-1, -1, -1, -1)"),
                       "serve_jpeg": ("image_bytes", "DT_STRING", "(-1)")}
    expected_outputs = {"probabilities": ("DT_FLOAT", "(-1, 9)"), "class_ids": ("DT_INT32", "(-1)"),
                        "class_names": ("DT_STRING", "(-1)"), "top_k_ids": ("DT_INT32", "(-1, 5)"),
                        "top_k_scores": ("DT_FLOAT", "(-1, 5)"), "top_k_names": ("DT_STRING", "(-1, 5)")}
    for signature, (name, dtype, shape) in expected_inputs.items():
        block = _signature_block(text, signature)
        inputs, outputs = block.split("contains the following output(s)")
        assert re.search(rf"inputs\['{name}'\] tensor_info:\s+dtype: {dtype}\s+shape: {re.escape(shape)}", inputs)
        assert sorted(re.findall(r"outputs\['(\w+)'\]", outputs)) == sorted(expected_outputs)
        for output, (out_dtype, out_shape) in expected_outputs.items():
            pattern = rf"outputs\['{output}'\] tensor_info:\s+dtype: {out_dtype}\s+shape: {re.escape(out_shape)}"
            assert re.search(pattern, outputs), (signature, output)


def test_export_checks_its_arguments(run, tmp_path):
    path = str(tmp_path / "m")
    args = dict(classifier=run["classifier"], path=path, image_size=(32, 32), stats=run["stats"])
    with pytest.raises(ValueError, match="probabilities must be \\(batch, 3\\) for 3 class names"):
        export_lib.export_classifier(class_names=run["class_names"][:3], **args)
    with pytest.raises(ValueError, match="class_names must be a sequence"):
        export_lib.export_classifier(class_names="abc", **args)
    with pytest.raises(ValueError, match="image_size must be"):
        export_lib.export_classifier(**dict(args, image_size=(32,)), class_names=run["class_names"])
    with pytest.raises(ValueError, match="normalization"):
        export_lib.export_classifier(**dict(args, stats={"normalization": "zca"}), class_names=run["class_names"])
    with pytest.raises(ValueError, match="top_k must be"):
        export_lib.export_classifier(class_names=run["class_names"], top_k=0, **args)
    assert not os.path.exists(path)


def test_float_tensors_are_refused_naming_uint8_and_the_documented_conversion_serves(run):
    """docs/serving.md: serving_default takes uint8; float images in [0, 1] are converted by the client
    (`tf.cast(tf.round(x * 255), tf.uint8)`), and then give what the uint8 images give."""
    serve = tf.saved_model.load(run["model_dir"]).signatures["serving_default"]
    images = run["eval_images"][:4]
    with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
        serve(images=tf.constant(images, tf.float32) / 255.0)
    floats = tf.constant(images, tf.float32) / 255.0
    converted = serve(images=tf.cast(tf.round(floats * 255.0), tf.uint8))["probabilities"].numpy()
    np.testing.assert_allclose(converted, _keras_probabilities(run, images), atol=1e-5)
