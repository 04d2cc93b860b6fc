"""Birdsnap TFDS builder on a small fake download with Birdsnap's real layout."""

import contextlib
import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow", reason="TensorFlow only: the Birdsnap TFDS builder and its tf.data pipeline")

from keras_cwsn.data import birdsnap  # noqa: E402
from keras_cwsn.data.info import DatasetInfo  # noqa: E402

# (species, birdsnap id, fine index in birdsnap34.tsv, coarse index in birdsnap34 numbering)
SPECIES = [
    ("Golden_Eagle", 4, 0, 0),  # Accipitridae
    ("Bald_Eagle", 17, 5, 0),  # Accipitridae
    ("Northern_Pintail", 27, 8, 2),  # Anatidae (Alcedinidae is coarse 1)
    ("Brant", 57, 11, 2),  # Anatidae
]
OTHER_SPECIES = ("Acadian_Flycatcher", 1)  # In birdsnap500, not in birdsnap34.
HEIGHT, WIDTH = 30, 40


def _jpeg(color, mode="RGB"):
    buffer = io.BytesIO()
    image = Image.new("RGB", (WIDTH, HEIGHT), color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_fake_birdsnap(root):
    """Writes a fake Birdsnap download under `root`; returns what the builder should find."""
    files = {}  # path relative to images/ -> bytes (None: listed but missing on disk)
    test_paths = []
    for s, (name, _, _, _) in enumerate(SPECIES):
        for i in range(3):
            files[f"{name}/{i}.jpg"] = _jpeg((60 * s, 10 * i, 100))
        files[f"{name}/test0.jpg"] = _jpeg((60 * s, 200, 0))
        test_paths.append(f"{name}/test0.jpg")
    files["Golden_Eagle/corrupt.jpg"] = np.random.default_rng(0).bytes(500)
    files["Bald_Eagle/missing.jpg"] = None
    files["Northern_Pintail/gray.jpg"] = _jpeg((90, 90, 90), mode="L")
    files["Brant/png_named.jpg"] = _png((0, 255, 0))
    files["Brant/cmyk.jpg"] = _jpeg((255, 0, 0), mode="CMYK")
    other = OTHER_SPECIES[0]
    files[f"{other}/0.jpg"] = _jpeg((1, 2, 3))
    files[f"{other}/test0.jpg"] = _jpeg((3, 2, 1))
    test_paths.append(f"{other}/test0.jpg")

    ids = {name: sid for name, sid, _, _ in SPECIES}
    ids[other] = OTHER_SPECIES[1]
    with open(os.path.join(root, "species.txt"), "w") as f:
        f.write("id\tcommon\tscientific\tdir\n")
        for name, sid in ids.items():
            f.write(f"{sid}\t{name.replace('_', ' ')}\tAvis {name.lower()}\t{name}\n")
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.write("url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2\n")
        for path in files:
            f.write(f"http://example.invalid/{path}\t0\t{path}\t{ids[path.split('/')[0]]}\t1\t1\t9\t9\n")
    with open(os.path.join(root, "test_images.txt"), "w") as f:
        f.write("path\n" + "".join(p + "\n" for p in test_paths))
    for path, data in files.items():
        if data is None:
            continue
        os.makedirs(os.path.join(root, "images", os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, "images", path), "wb") as f:
            f.write(data)
    return files, test_paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepares birdsnap34 once from a fake download; returns (manual_dir, data_dir, stdout)."""
    manual_dir = str(tmp_path_factory.mktemp("birdsnap_download"))
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    make_fake_birdsnap(manual_dir)
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        birdsnap.prepare_birdsnap("birdsnap34", data_dir=data_dir, manual_dir=manual_dir)
    return manual_dir, data_dir, capture.getvalue()


def _expected_fine(path):
    return {name: fine for name, _, fine, _ in SPECIES}[path.split("/")[0]]


def test_labels_and_images(prepared):
    manual_dir, data_dir, _ = prepared
    ds, info = birdsnap.load_birdsnap("birdsnap34", "train", data_dir=data_dir, manual_dir=manual_dir)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 15  # 4 x 3 + gray + png + cmyk; corrupt and missing skipped.
    for image, fine, coarse in examples:
        assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
        assert fine.dtype == np.int64 and coarse.dtype == np.int64
        assert coarse == info.fine_to_coarse[fine]
    counts = {}
    for _, fine, _ in examples:
        counts[int(fine)] = counts.get(int(fine), 0) + 1
    assert counts == {0: 3, 5: 3, 8: 4, 11: 5}

    # Exact labels per file, through the builder's own features.
    builder = birdsnap.birdsnap_builder("birdsnap34", data_dir=data_dir)
    for ex in builder.as_dataset(split="train").as_numpy_iterator():
        path = ex["file_name"].decode()
        name = path.split("/")[0]
        (species,) = [s for s in SPECIES if s[0] == name]
        assert ex["fine"] == species[2] and ex["coarse"] == species[3]
        assert info.fine_names[ex["fine"]] == name
    assert info.coarse_names[0] == "Accipitridae" and info.coarse_names[2] == "Anatidae"


def test_converted_images_are_rgb(prepared):
    _, data_dir, _ = prepared
    builder = birdsnap.birdsnap_builder("birdsnap34", data_dir=data_dir)
    images = {
        ex["file_name"].decode(): ex["image"]
        for ex in builder.as_dataset(split="train").as_numpy_iterator()
    }
    gray = images["Northern_Pintail/gray.jpg"]
    assert gray.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(gray[..., 0].astype(int) - gray[..., 2]).max() <= 2  # Still gray.
    assert images["Brant/png_named.jpg"][..., 1].mean() > 200  # Green survived.
    assert images["Brant/cmyk.jpg"][..., 0].mean() > 200  # Red survived.


def test_split_sizes_and_report(prepared):
    manual_dir, data_dir, stdout = prepared
    ds, info = birdsnap.load_birdsnap("birdsnap34", "test", data_dir=data_dir, manual_dir=manual_dir)
    fines = sorted(int(f) for _, f, _ in ds.as_numpy_iterator())
    assert fines == [0, 5, 8, 11]  # The other species' test image is ignored.
    assert info.num_examples == {"train": 15, "test": 4}

    report = birdsnap.read_preparation_report("birdsnap34", data_dir=data_dir)
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert train["examples_written"] == 15
    assert train["skipped_missing"] == 1 and train["missing_files"] == ["Bald_Eagle/missing.jpg"]
    assert train["skipped_corrupt"] == 1
    assert [c["file_name"] for c in train["corrupt_files"]] == ["Golden_Eagle/corrupt.jpg"]
    assert sorted(train["converted_files"]) == [
        "Brant/cmyk.jpg",
        "Brant/png_named.jpg",
        "Northern_Pintail/gray.jpg",
    ]
    assert len(train["species_without_examples"]) == 30
    assert (test["examples_written"], test["skipped_missing"], test["skipped_corrupt"]) == (4, 0, 0)
    assert report["ignored_other_species"] == 2
    # One summary paragraph printed while preparing.
    assert "train 15 examples (skipped 1 missing, 1 corrupt" in stdout
    assert "test 4 examples" in stdout


def test_second_prepare_is_a_no_op(prepared, tmp_path, capsys):
    manual_dir, data_dir, _ = prepared
    records = sorted(glob.glob(os.path.join(data_dir, "cwsn_birdsnap", "birdsnap34", "*", "*tfrecord*")))
    assert records
    mtimes = [os.stat(p).st_mtime_ns for p in records]
    # Without naming the download, or naming the one it came from: reused, the download not read again.
    birdsnap.prepare_birdsnap("birdsnap34", data_dir=data_dir, manual_dir=manual_dir)
    builder = birdsnap.prepare_birdsnap("birdsnap34", data_dir=data_dir)
    builder.download_and_prepare()  # TFDS's own reuse path.
    assert [os.stat(p).st_mtime_ns for p in records] == mtimes
    assert sorted(glob.glob(os.path.join(data_dir, "cwsn_birdsnap", "birdsnap34", "*", "*tfrecord*"))) == records
    assert "Prepared" not in capsys.readouterr().out


def test_dataset_info_sizes():
    info = birdsnap.birdsnap_dataset_info("birdsnap34")
    assert isinstance(info, DatasetInfo)
    assert (info.num_fine, info.num_coarse) == (34, 18)
    assert info.image_size == (224, 224) and info.normalization == "imagenet"
    assert info.fine_names[0] == "Golden_Eagle" and info.coarse_names[0] == "Accipitridae"
    assert birdsnap.birdsnap_dataset_info("birdsnap500").num_fine == 500
    with pytest.raises(ValueError, match="birdsnap34"):
        birdsnap.birdsnap_dataset_info("birdsnap35")


def test_helpful_error_without_download(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    missing = tmp_path / "no_such_dir"
    with pytest.raises(birdsnap.BirdsnapNotFoundError) as err:
        birdsnap.load_birdsnap(data_dir=data_dir, manual_dir=str(missing))
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in message and "does not exist" in message
    assert "python -m keras_cwsn.data.birdsnap download" in message
    assert "thomasberg.org" in message and birdsnap.MANUAL_DIR_ENV in message

    # A partial download: the message names the missing file; the env var is honoured.
    partial = tmp_path / "partial"
    partial.mkdir()
    make_fake_birdsnap(str(partial))
    os.remove(partial / "test_images.txt")
    monkeypatch.setenv(birdsnap.MANUAL_DIR_ENV, str(partial))
    with pytest.raises(birdsnap.BirdsnapNotFoundError, match="test_images.txt is missing") as err:
        birdsnap.load_birdsnap(data_dir=data_dir)
    assert str(partial) in str(err.value) and birdsnap.MANUAL_DIR_ENV in str(err.value)
    assert not os.path.exists(os.path.join(data_dir, "cwsn_birdsnap", "birdsnap34"))


def test_prepare_command_reports_missing_download(tmp_path, capsys):
    rc = birdsnap.main(
        ["prepare", "--manual-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "tfds")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not exist" in err


def test_birdsnap500_includes_other_species(prepared, tmp_path):
    manual_dir, _, _ = prepared
    ds, info = birdsnap.load_birdsnap(
        "birdsnap500", "test", data_dir=str(tmp_path / "tfds500"), manual_dir=manual_dir
    )
    names = sorted(info.fine_names[int(f)] for _, f, _ in ds.as_numpy_iterator())
    assert names == sorted([s[0] for s in SPECIES] + [OTHER_SPECIES[0]])
    report = birdsnap.read_preparation_report("birdsnap500", data_dir=str(tmp_path / "tfds500"))
    assert report["splits"]["train"]["examples_written"] == 16
    assert json.dumps(report)  # Plain JSON types only.


def test_split_without_any_usable_image_fails_clearly(tmp_path):
    manual_dir = tmp_path / "download"
    manual_dir.mkdir()
    make_fake_birdsnap(str(manual_dir))
    (manual_dir / "test_images.txt").write_text("path\nBrant/not_downloaded.jpg\n")
    data_dir = tmp_path / "tfds"
    with pytest.raises(birdsnap.BirdsnapNotFoundError, match="No usable image for split 'test'"):
        birdsnap.prepare_birdsnap("birdsnap34", data_dir=str(data_dir), manual_dir=str(manual_dir))
    assert not birdsnap.birdsnap_builder("birdsnap34", data_dir=str(data_dir)).is_prepared()


def test_labels_without_decoding_match_dataset_order(prepared):
    manual_dir, data_dir, _ = prepared
    for split in ("train", "test"):
        ds, _ = birdsnap.load_birdsnap("birdsnap34", split, data_dir=data_dir)
        labels = birdsnap.load_birdsnap_labels("birdsnap34", split, data_dir=data_dir)
        assert labels.dtype == np.int64
        assert labels.tolist() == [int(f) for _, f, _ in ds.as_numpy_iterator()]


def test_train_pipeline_over_a_fake_download(tmp_path, monkeypatch):
    """`--dataset birdsnap34 --data-dir DOWNLOAD`: 224x224 ImageNet-normalised batches, labels at both levels."""
    from keras_cwsn import data

    manual_dir = str(tmp_path / "download")
    os.makedirs(manual_dir)
    make_fake_birdsnap(manual_dir)
    train = data.load_split("birdsnap34", "train", data_dir=manual_dir)
    test = data.load_split("birdsnap34", "test", data_dir=manual_dir)
    assert len(test) == len(SPECIES)
    assert train.info.num_fine == 34 and train.info.normalization == "imagenet"
    stats = data.preprocessing_stats(train, verbose=False)
    levels = {"fine_fc3": "fine", "coarse_fc1": "coarse"}
    for augment in (False, True):
        images, labels = next(iter(data.make_pipeline(train, stats, 4, levels, training=True, augment=augment)))
        assert images.shape == (4, 224, 224, 3)
        assert -2.2 < float(np.min(images)) and float(np.max(images)) < 2.7  # ImageNet-normalised range
        np.testing.assert_array_equal(labels["coarse_fc1"].numpy(), train.info.coarse_of(labels["fine_fc3"].numpy()))
    assert set(train.labels.tolist()) == {fine for _, _, fine, _ in SPECIES}
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "fresh_cache"))  # nothing prepared there
    with pytest.raises(data.DatasetUnavailableError, match="Birdsnap download not found"):
        data.load_split("birdsnap34", "train", data_dir=str(tmp_path))


def _one_species_less(root):
    """A second fake download: the first one without Brant's images (another file list, other split sizes)."""
    make_fake_birdsnap(root)
    for name in os.listdir(os.path.join(root, "images", "Brant")):
        os.remove(os.path.join(root, "images", "Brant", name))
    return root


def test_prepared_data_follows_the_download_data_dir_names(tmp_path, monkeypatch, capsys):
    """Issue 38: a dataset prepared from one download is never silently read for another --data-dir."""
    from keras_cwsn import data
    from keras_cwsn.config import load_config
    from keras_cwsn.training import log
    from keras_cwsn.training.inputs import load_run_data

    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    os.makedirs(first)
    os.makedirs(second)
    make_fake_birdsnap(first)
    _one_species_less(second)
    assert len(data.load_split("birdsnap34", "train", data_dir=first)) == 15
    prepared = tmp_path / "cache" / "tfds" / "cwsn_birdsnap" / "birdsnap34"  # under KERAS_CWSN_CACHE, not ~/.cache
    assert prepared.is_dir()
    report = birdsnap.read_preparation_report("birdsnap34", data_dir=str(tmp_path / "cache" / "tfds"))
    assert report["manual_dir"] == first and len(report["source_fingerprint"]) == 20

    train = data.load_split("birdsnap34", "train", data_dir=second)  # another download: prepared again from it
    assert len(train) == 10 and 11 not in train.labels.tolist()
    assert f"preparing it again from {second}" in capsys.readouterr().out
    assert train.report["source"].startswith(f"the Birdsnap download {second} ")

    (tmp_path / "empty").mkdir()  # not a download at all: refused, in one short line naming the flag
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_split("birdsnap34", "train", data_dir=str(tmp_path / "empty"))
    message = str(err.value)
    assert "--data-dir" in message and "manual_dir=" not in message, message
    assert len(message.replace(str(tmp_path), "T")) < 400, message  # short, but for the paths
    assert f"came from {second}" in message

    config = load_config(dataset="birdsnap34")
    config["data_dir"] = second
    run_data = load_run_data(config, quiet=True)
    line = log.data_line(config, run_data)
    assert line.startswith(f"birdsnap34 from the Birdsnap download {second} (prepared in ")
    assert "train 10, test 3 images; 34 classes in 18 groups; skipped 8 file(s)" in line, line  # 7 + 1 listed, missing or corrupt
