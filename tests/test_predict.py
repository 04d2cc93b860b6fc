"""Tests for keras_cwsn.predict: the command line classifies image files with the SavedModel alone."""

import ast
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: predict serves the exported SavedModel")

from conftest import ROOT, subprocess_env, yuv_reference  # noqa: E402
from keras_cwsn import export as export_lib  # noqa: E402
from keras_cwsn import predict  # noqa: E402
from keras_cwsn.models import build_model  # noqa: E402
CLASS_NAMES = ("cat", "dog", "bird")  # 3 classes: the exported top k is capped at 3
STATS = {"normalization": "yuv", "uv_mean": [0.01, -0.02], "uv_std": [0.1, 0.12]}
# Runs the real `python -m keras_cwsn.predict` entry point, then says which keras_cwsn modules it loaded.
CLI = ("import runpy, sys\n"
       "sys.argv = ['predict', *sys.argv[1:]]\n"
       "try:\n"
       "    runpy.run_module('keras_cwsn.predict', run_name='__main__', alter_sys=True)\n"
       "except SystemExit as e:\n"
       "    code = e.code\n"
       "print('LOADED', sorted(m for m in sys.modules if m.startswith('keras_cwsn')), file=sys.stderr)\n"
       "sys.exit(code)\n")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small seeded classifier exported once: (SavedModel folder, Keras classifier)."""
    keras.utils.set_random_seed(0)
    classifier = build_model("lenet", "ce", num_fine=len(CLASS_NAMES), input_shape=(32, 32, 3))
    path = str(tmp_path_factory.mktemp("predict_model") / "classifier")
    export_lib.export_classifier(classifier, path, CLASS_NAMES, (32, 32), STATS,
                                 metadata={"dataset": "toy", "variant": "D"})
    return path, classifier


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of images, non-image files and broken images; returns (folder, {name: uint8 RGB array})."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    arrays = {"a.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "b.jpg": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
              "sub/c.png": rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)}
    os.makedirs(folder / "sub")
    encoded = {}
    for name, array in arrays.items():
        data = tf.io.encode_jpeg(array, quality=95) if name.endswith(".jpg") else tf.io.encode_png(array)
        encoded[name] = data.numpy()
        (folder / name).write_bytes(encoded[name])
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "labels.csv").write_text("a,b\n")
    (folder / "corrupt.png").write_bytes(b"\x00garbage\x00")
    (folder / "truncated.jpg").write_bytes(encoded["b.jpg"][:200])
    decoded = {name: tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
               for name, data in encoded.items()}
    return str(folder), decoded


def _expected(classifier, image):
    """Keras probabilities of one decoded RGB image, resized as the folder pipeline does (bilinear,
    antialiased, rounded), then preprocessed by the NumPy BT.601 reference (not the code in the export)."""
    x = tf.cast(image[None], tf.float32)
    if image.shape[:2] != (32, 32):
        x = tf.round(tf.clip_by_value(tf.image.resize(x, (32, 32), method="bilinear", antialias=True), 0, 255))
    x = yuv_reference(np.asarray(x), STATS["uv_mean"], STATS["uv_std"]).astype(np.float32)
    return classifier(x, training=False)["probabilities"].numpy()[0]


def _check_result(result, classifier, image, top_k):
    probabilities = _expected(classifier, image)
    order = np.argsort(-probabilities)[:top_k]
    assert [c["class_id"] for c in result["top_k"]] == order.tolist()
    assert [c["class_name"] for c in result["top_k"]] == [CLASS_NAMES[i] for i in order]
    np.testing.assert_allclose([c["score"] for c in result["top_k"]], probabilities[order], atol=2e-6)


def test_cli_in_a_fresh_process(model, images):
    model_dir, classifier = model
    folder, decoded = images
    proc = subprocess.run([sys.executable, "-c", CLI, "--model", model_dir, folder, "--json", "--top-k", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr  # two broken images: reported, skipped, status 1
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {os.path.relpath(r["path"], folder): r for r in results}
    assert sorted(by_name) == ["a.png", "b.jpg", "sub/c.png"]
    for name, result in by_name.items():
        _check_result(result, classifier, decoded[name], top_k=2)
    stderr = proc.stderr
    assert "skipped 2 non-image file(s) (notes.txt, labels.csv)" in stderr
    assert "corrupt.png: could not decode: not a JPEG, PNG, GIF, BMP or WebP image (9 bytes)" in stderr
    assert "truncated.jpg: could not decode: " in stderr
    assert "3 of 5 image(s) classified; 2 could not be decoded" in stderr
    # the lazy __init__ and the light shared modules (names, errors, what is installed) alone: no model code
    assert ("LOADED ['keras_cwsn', 'keras_cwsn._lazy', 'keras_cwsn.constants', 'keras_cwsn.errors', "
            "'keras_cwsn.optional']\n") in stderr


def test_predict_module_does_not_import_keras():
    with open(predict.__file__) as f:
        tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    light = {"keras_cwsn.constants", "keras_cwsn.errors", "keras_cwsn.optional"}  # import neither Keras nor TF
    assert not {m for m in imported if m.split(".")[0] in ("keras", "keras_cwsn")} - light
    for name in light:
        with open(os.path.join(ROOT, *name.split(".")) + ".py") as f:
            tree = ast.parse(f.read())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))  # at import time
                    and any(a.name.split(".")[0] in ("keras", "tensorflow") for a in n.names)
                    or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ("keras", "tensorflow")]


def test_text_output_and_top_k_capped_at_the_classes(model, images, capsys):
    model_dir, classifier = model
    folder, decoded = images
    assert predict.main(["--model", model_dir, os.path.join(folder, "a.png"), "--top-k", "10"]) == 0
    out, err = capsys.readouterr()
    line = out.strip()
    assert line.startswith(os.path.join(folder, "a.png") + ": ") and line.count(",") == 2  # 3 classes
    probabilities = _expected(classifier, decoded["a.png"])
    best = int(np.argmax(probabilities))
    assert line.split(": ", 1)[1].startswith(f"{CLASS_NAMES[best]} {probabilities[best]:.4f}")
    assert "skipped" not in err


def test_batches_with_a_broken_file_keep_the_others(model, images):
    model_dir, classifier = model
    folder, decoded = images
    loaded, info = predict.load_model(model_dir)
    assert info["class_names"] == list(CLASS_NAMES) and info["dataset"] == "toy"
    paths = [os.path.join(folder, n) for n in ("a.png", "corrupt.png", "b.jpg", "sub/c.png")]
    for batch_size in (1, 4):
        results = list(predict.classify(loaded, paths, top_k=3, class_names=info["class_names"],
                                        batch_size=batch_size))
        assert [r["path"] for r in results] == paths
        assert "could not decode" in results[1]["error"]
        for result, name in zip([results[0], results[2], results[3]], ["a.png", "b.jpg", "sub/c.png"]):
            _check_result(result, classifier, decoded[name], top_k=3)


def test_without_class_list_uses_the_signature_names(model, images):
    model_dir, classifier = model
    folder, decoded = images
    loaded, _ = predict.load_model(model_dir)
    [result] = predict.classify(loaded, [os.path.join(folder, "a.png")], top_k=2, class_names=None)
    _check_result(result, classifier, decoded["a.png"], top_k=2)


def _one_line_error(capsys, argv, expected):
    assert predict.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    return lines[0]


def test_missing_model_folder(images, capsys, tmp_path):
    folder, _ = images
    _one_line_error(capsys, ["--model", str(tmp_path / "nope"), folder], "no such model folder")


def test_missing_model_folder_in_a_fresh_process(images, tmp_path):
    folder, _ = images
    proc = subprocess.run([sys.executable, "-m", "keras_cwsn.predict", "--model", str(tmp_path / "nope"), folder],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"python -m keras_cwsn.predict: error: no such model folder: {tmp_path / 'nope'}"]


def test_folder_that_is_not_a_saved_model(images, capsys, tmp_path):
    folder, _ = images
    _one_line_error(capsys, ["--model", str(tmp_path), folder], "is not a SavedModel folder")


def test_missing_image_file(model, capsys, tmp_path):
    _one_line_error(capsys, ["--model", model[0], str(tmp_path / "missing.jpg")], "no such image file or folder")


def test_folder_without_images(model, capsys, tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    line = _one_line_error(capsys, ["--model", model[0], str(tmp_path)], "no image files to classify")
    assert "skipped 1 non-image file(s) (readme.md)" in line


def test_bad_top_k(model, images, capsys):
    _one_line_error(capsys, ["--model", model[0], images[0], "--top-k", "0"], "--top-k must be >= 1")
