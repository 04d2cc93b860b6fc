"""Your own data: a folder of class sub-folders plus a hierarchy table runs the whole protocol.

A tiny bird-like tree (6 species in 3 families, JPEGs) is trained on AlexNet at 64x64 with every
variant and `ce`, on the Appendix B settings AlexNet takes (Birdsnap34's, with their per-variant
clustering batch sizes). Every way a table and its folders can disagree is one line and exit 2.
"""

import csv
import json
import os

import numpy as np
import pytest

import train
from conftest import error_line, write_image
from keras_cwsn.optional import tensorflow_available

SPECIES = {"Red_Fox_Sparrow": "Passerellidae", "Song_Sparrow": "Passerellidae", "Blue_Jay": "Corvidae",
           "Common_Raven": "Corvidae", "Mallard": "Anatidae", "Wood_Duck": "Anatidae"}
# The settings the AlexNet config leaves alone, shrunk: 64x64 images, a batch of 8 to classify.
SMALL = ["--set", "image_size=64", "--epochs", "1", "--set", "classify.batch_size=8", "--set", "embedding_sample=8",
         "--quiet"]


def write_table(path, rows, delimiter="\t", header=("folder", "genus", "family")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def make_bird_tree(root, species=SPECIES, per_class=(4, 2), size=72, seed=0):
    """root/{train,test}/<species>/NN.jpg: each species its own colour, so there is something to learn."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for k, name in enumerate(species):
            for i in range(count):
                image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                image[..., k % 3] += np.uint8(60 + 30 * k)
                write_image(os.path.join(root, split, name, f"{i:02d}.jpg"), image)
    return str(root)


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    root = tmp_path_factory.mktemp("birds")
    tree = make_bird_tree(root / "tree")
    rows = [(name, name.split("_")[-1], family) for name, family in SPECIES.items()]
    return {"tree": tree, "table": write_table(root / "taxonomy.tsv", rows), "rows": rows, "root": root}


def own_args(birds, *extra, table=None, data_dir=None):
    return ["--data-dir", data_dir or birds["tree"], "--hierarchy", table or birds["table"], "--coarse-column", "family",
            "--arch", "alexnet", *SMALL, *extra]


@pytest.fixture(scope="module")
def runs(birds, tmp_path_factory):
    """One finished run per variant (and ce), AlexNet at 64x64 on the tiny tree."""
    out = tmp_path_factory.mktemp("own-runs")
    done = {}
    for variant in ("A", "B", "C", "D", "ce"):
        run_dir = str(out / variant)
        assert train.main(own_args(birds, "--variant", variant, "--output-dir", run_dir)) == 0, variant
        with open(os.path.join(run_dir, "metrics.json")) as f:
            done[variant] = dict(json.load(f), dir=run_dir)
    return done


@pytest.mark.heavy
def test_every_variant_and_ce_finish_on_alexnet(runs):
    for variant, metrics in runs.items():
        config = metrics["config"]
        assert (config["dataset"], config["arch"], config["variant"]) == ("folder", "alexnet", variant)
        assert metrics["eval_split"] == "test"  # the tree has test/: the figures are on it
        assert 0.0 <= metrics["classification_accuracy"] <= 1.0
        assert ("cluster_accuracy" in metrics) == (variant != "ce")
        assert os.path.isfile(os.path.join(metrics["dir"], "classifier.keras"))
        # The SavedModel is TensorFlow's; on JAX `python -m keras_cwsn.export RUN` writes it where TF is.
        assert os.path.isdir(os.path.join(metrics["dir"], "classifier")) == tensorflow_available()
    # The network's settings: Birdsnap34's Appendix B clustering batch (A 1024, B-D 128), ImageNet inputs.
    assert runs["A"]["config"]["cluster"]["batch_size"]["A"] == 1024
    stats = json.load(open(os.path.join(runs["C"]["dir"], "preprocessing.json")))
    assert stats["normalization"] == "imagenet"


@pytest.mark.heavy
def test_class_and_coarse_names_travel_with_the_run(runs):
    metrics = runs["C"]
    assert metrics["class_names"] == list(SPECIES)  # the table's order fixes the labels
    assert metrics["coarse_names"] == ["Passerellidae", "Corvidae", "Anatidae"]
    assert metrics["fine_to_coarse"] == [0, 0, 1, 1, 2, 2]
    if not tensorflow_available():
        return
    with open(os.path.join(metrics["dir"], "classifier", "assets", "cwsn_model_info.json")) as f:
        model_info = json.load(f)
    assert model_info["class_names"] == list(SPECIES)
    assert model_info["coarse_names"] == metrics["coarse_names"]
    assert model_info["image_size"] == [64, 64]


@pytest.mark.heavy
def test_saved_model_evaluate_and_predict_name_the_species(runs, birds, capsys):
    tf = pytest.importorskip("tensorflow")
    from keras_cwsn import evaluate, predict

    run_dir = runs["D"]["dir"]
    serve = tf.saved_model.load(os.path.join(run_dir, "classifier")).signatures["serving_default"]
    images = tf.zeros((2, 90, 70, 3), tf.uint8)  # any size: the signature resizes
    names = serve(images=images)["class_names"].numpy().astype(str).tolist()
    assert set(names) <= set(SPECIES)
    capsys.readouterr()
    assert evaluate.main([run_dir, "--split", "test", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["num_examples"] == 2 * len(SPECIES)
    assert figures["classification_accuracy"] == pytest.approx(runs["D"]["classification_accuracy"])
    assert figures["cluster_accuracy"] <= figures["coarse_agreement"] <= 1  # a right species is a right family
    for key in ("coarse_agreement", "coarse_agreement_of_errors"):  # training recorded the same on the same split
        assert runs["D"][key] == pytest.approx(figures[key]), key
    folder = os.path.join(birds["tree"], "test", "Mallard")
    assert predict.main(["--model", os.path.join(run_dir, "classifier"), folder, "--json", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(top["class_name"] in SPECIES for line in lines for top in line["top_k"]), lines
    assert all(len(line["top_k"]) == 2 for line in lines)


def _linked_copy(run_dir, dest, skip=()):
    """The run's files linked into `dest`, but for those in `skip` (to be written afresh)."""
    os.makedirs(dest)
    for name in os.listdir(run_dir):
        if name not in skip:
            os.symlink(os.path.join(run_dir, name), os.path.join(dest, name))
    return str(dest)


@pytest.mark.heavy
def test_evaluate_reads_the_table_the_run_trained_with_and_any_subset_of_its_classes(runs, birds, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from keras_cwsn import evaluate

    run_dir = runs["C"]["dir"]
    with open(birds["table"], "rb") as f, open(os.path.join(run_dir, "hierarchy_table.tsv"), "rb") as g:
        assert f.read() == g.read()  # the run keeps its table
    config = json.load(open(os.path.join(run_dir, "config.json")))
    # The table's path no longer names it (moved, or relative to another working folder): the copy answers.
    moved = _linked_copy(run_dir, tmp_path / "moved", skip=("config.json",))
    json.dump(dict(config, hierarchy=str(tmp_path / "gone.tsv")), open(os.path.join(moved, "config.json"), "w"))
    capsys.readouterr()
    assert evaluate.main([moved, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classification_accuracy"] == pytest.approx(
        runs["C"]["classification_accuracy"])
    # A run without its copy (older runs) whose table has since been reordered: refused, not 0% reported.
    reordered = write_table(tmp_path / "reordered.tsv", birds["rows"][::-1])
    old = _linked_copy(run_dir, tmp_path / "old", skip=("config.json", "hierarchy_table.tsv"))
    json.dump(dict(config, hierarchy=reordered), open(os.path.join(old, "config.json"), "w"))
    assert evaluate.main([old]) == 2
    assert "same classes in another order" in error_line(capsys)
    # A folder holding some of the classes is evaluated on those.
    subset = tmp_path / "subset"
    os.makedirs(subset / "test")
    os.symlink(os.path.join(birds["tree"], "test", "Mallard"), subset / "test" / "Mallard")
    assert evaluate.main([run_dir, "--data-dir", str(subset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 2


def test_images_in_folders_inside_a_class_folder_are_named_not_silently_dropped(tmp_path):
    from keras_cwsn.data.folder import list_split

    make_bird_tree(tmp_path, species={"Mallard": "Anatidae", "Wood_Duck": "Anatidae"}, per_class=(2, 0))
    write_image(str(tmp_path / "train" / "Mallard" / "more" / "00.jpg"), np.zeros((8, 8, 3), np.uint8))
    os.makedirs(tmp_path / "train" / "Mallard" / "odd.jpg")  # a folder named like an image is not one
    paths, labels, report = list_split(str(tmp_path), "train", ["Mallard", "Wood_Duck"])
    assert len(paths) == 4 and report["sub_folders"] == ["Mallard/more", "Mallard/odd.jpg"]
    assert report["non_image_files"] == 0


def test_a_hierarchy_table_names_your_own_data_beside_a_config_file_or_in_it(birds, tmp_path):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("arch: alexnet\nvariant: C\n")
    args = train.parse_args(["--config", str(config_file), *own_args(birds)])
    assert train.resolve_config(args)["dataset"] == "folder"
    config_file.write_text(f"arch: alexnet\nhierarchy: {birds['table']}\ncoarse_column: family\n"
                           f"data_dir: {birds['tree']}\n")
    config = train.resolve_config(train.parse_args(["--config", str(config_file)]))
    assert (config["dataset"], config["coarse_column"]) == ("folder", "family")


def test_a_csv_table_and_a_named_fine_column(birds, tmp_path):
    from keras_cwsn.data import dataset_info, dataset_spec

    rows = [(family, name, "x") for name, family in SPECIES.items()]
    table = write_table(tmp_path / "t.csv", rows, delimiter=",", header=("family", "species", "note"))
    config = {"dataset": "folder", "arch": "lenet", "hierarchy": table, "fine_column": "species",
              "coarse_column": "family", "image_size": None, "normalization": None}
    info = dataset_info(dataset_spec(config))
    assert info.fine_names == tuple(SPECIES) and info.num_coarse == 3
    assert (info.image_size, info.normalization) == ((32, 32), "yuv")  # LeNet's, as on CIFAR-10


def test_cub42_is_birdsnap34s_protocol_on_cub_species():
    from keras_cwsn.config import load_config, phase_settings
    from keras_cwsn.data import dataset_info, dataset_spec

    config = load_config(dataset="cub42")
    assert (config["dataset"], config["arch"], config["eval_split"]) == ("cub42", "alexnet", "test")
    birdsnap = load_config(dataset="birdsnap34")
    for phase in ("cluster", "classify"):
        for variant in ("A", "C"):
            assert (phase_settings(dict(config, variant=variant), phase)
                    == phase_settings(dict(birdsnap, variant=variant), phase))
    info = dataset_info(dataset_spec(config))
    assert (info.num_fine, info.num_coarse) == (42, 21)
    assert np.all(np.bincount(info.fine_to_coarse) == 2)  # two species per family
    assert (info.image_size, info.normalization) == ((224, 224), "imagenet")
    assert "Red_winged_Blackbird" in info.fine_names and "Icteridae" in info.coarse_names


def test_folder_names_match_in_any_unicode_form_and_system_folders_are_not_classes(tmp_path):
    import unicodedata

    from keras_cwsn.data.folder import FolderError, list_split

    composed = "Étourneau_sansonnet"
    decomposed = unicodedata.normalize("NFD", composed)  # as macOS writes it
    assert decomposed != composed
    make_bird_tree(tmp_path, species={decomposed: "Sturnidae", "Mallard": "Anatidae"}, per_class=(2, 0))
    for system in (".ipynb_checkpoints", "__MACOSX"):
        os.makedirs(tmp_path / "train" / system)
    paths, labels, report = list_split(str(tmp_path), "train", [composed, "Mallard"], every_class=True)
    assert list(labels) == [0, 0, 1, 1] and report["empty_class_folders"] == []
    with pytest.raises(FolderError, match="--fine-column"):  # no folder is a class: the wrong column, likely
        list_split(str(tmp_path), "train", ["1", "2"])


def test_table_errors_name_the_files_own_lines_and_a_wrong_separator(tmp_path):
    from keras_cwsn.data.info import HierarchyTableError, read_hierarchy_table

    table = tmp_path / "blank_lines.tsv"
    table.write_text("folder\tfamily\n\n\nMallard\tAnatidae\n\nMallard\tAnatidae\n")
    with pytest.raises(HierarchyTableError, match=r"line 6: class 'Mallard' is listed twice \(first on line 4\)"):
        read_hierarchy_table(str(table), None, "family")
    commas = tmp_path / "commas.tsv"
    commas.write_text("folder,family\nMallard,Anatidae\n")
    with pytest.raises(HierarchyTableError, match="one column, 'folder,family': is it tab-separated"):
        read_hierarchy_table(str(commas), None, "family")


@pytest.mark.parametrize("case, expected", [
    ("extra_folder", "not in the class table"),
    ("row_without_folder", "no folder for 1 class"),
    ("empty_coarse", "has an empty 'family'"),
    ("single_group", "at least two groups"),
    ("missing_column", "no coarse column 'family'"),
    ("duplicate_row", "listed twice"),
    ("missing_table", "Hierarchy table not found"),
])
def test_a_table_at_odds_with_its_folders_is_one_line_and_trains_nothing(birds, tmp_path, capsys, case, expected):
    rows, tree, header = list(birds["rows"]), birds["tree"], ("folder", "genus", "family")
    if case == "extra_folder":
        rows = rows[:-1]
    elif case == "row_without_folder":
        rows.append(("Snowy_Owl", "Owl", "Strigidae"))
    elif case == "empty_coarse":
        rows[2] = (rows[2][0], rows[2][1], "")
    elif case == "single_group":
        rows = [(name, genus, "Aves") for name, genus, _ in rows]
    elif case == "missing_column":
        header = ("folder", "genus", "families")
    elif case == "duplicate_row":
        rows.append(rows[0])
    table = write_table(tmp_path / "table.tsv", rows, header=header)
    if case == "missing_table":
        table = str(tmp_path / "nowhere.tsv")
    out = tmp_path / "run"
    assert train.main(own_args(birds, "--output-dir", str(out), table=table, data_dir=tree)) == 2
    line = error_line(capsys)
    assert expected in line, line
    assert not out.exists() or not any(name.endswith((".keras", "metrics.json")) for name in os.listdir(out))


@pytest.mark.parametrize("argv, expected", [
    (["--hierarchy", "t.tsv", "--coarse-column", "family"], "--data-dir"),  # a folder dataset without its folder
    (["--dataset", "folder", "--data-dir", "."], "needs a hierarchy table"),
    (["--dataset", "cifar10", "--hierarchy", "t.tsv"], "apply to folder datasets"),
    (["--dataset", "synthetic", "--set", "image_size=64"], "don't apply to the synthetic dataset"),
    (["--hierarchy", "t.tsv", "--data-dir", ".", "--set", "image_size=8"], "image_size"),
    (["--hierarchy", "t.tsv", "--coarse-column", "family", "--data-dir", ".", "--set", "image_size=32"],
     "too small for alexnet: it needs a side of at least 63"),
])
def test_own_data_flags_misused_are_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_table(tmp_path / "t.tsv", [(name, "g", family) for name, family in SPECIES.items()])
    assert train.main([*argv, "--output-dir", str(tmp_path / "r"), "--quiet"]) == 2
    assert expected in error_line(capsys)
