"""What a run leaves behind besides its figures: config, provenance, projector embeddings, summaries.

TensorBoard's own files (the config text, HParams) need TensorFlow; without it they are skipped
with a one-line notice and everything else is written.
"""

import contextlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata

import keras
import numpy as np

from keras_cwsn.atomic import atomic_path, write_json_atomic
from keras_cwsn.constants import HIERARCHY_SNAPSHOT
from keras_cwsn.constants import FIGURES
from keras_cwsn.errors import RunError, one_line
from keras_cwsn.metrics import seed_std
from keras_cwsn.models import penultimate_model
from keras_cwsn.optional import onednn_enabled, tensorflow_available


@contextlib.contextmanager
def writing(what, path):
    """Turn a failed write (disk full, read-only folder, ...) into a RunError that says what and where."""
    try:
        yield
    except OSError as e:
        raise RunError(f"Cannot write {what} to {path}: {one_line(e)}") from e


def save_keras_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def write_config(output_dir, config):
    """config.json, a copy of the run's hierarchy table (`table_snapshot`), and the config as text in
    TensorBoard (when TensorFlow is there)."""
    write_json_atomic(os.path.join(output_dir, "config.json"), config)
    if config.get("hierarchy"):
        with open(config["hierarchy"], "rb") as f:
            table = f.read()
        with atomic_path(table_snapshot_path(output_dir, config["hierarchy"])) as tmp, open(tmp, "wb") as f:
            f.write(table)
    write_text_summary(os.path.join(output_dir, "logs", "config"), "config",
                       "```\n" + json.dumps(config, indent=2) + "\n```")


def table_snapshot_path(output_dir, table):
    """Where a run keeps the hierarchy table it trained with (its class ids are that table's row order), so
    that `evaluate` reads the same labels wherever it runs and whatever becomes of the original file."""
    return os.path.join(output_dir, HIERARCHY_SNAPSHOT + (".csv" if table.lower().endswith(".csv") else ".tsv"))


def table_snapshot(output_dir):
    """The run's copy of its hierarchy table, or None (a registered dataset, or a run from before copies)."""
    found = [p for p in (os.path.join(output_dir, HIERARCHY_SNAPSHOT + ext) for ext in (".tsv", ".csv"))
             if os.path.isfile(p)]
    return found[0] if found else None


def write_text_summary(folder, tag, text):
    """One text summary in an event file of `folder` (a TensorBoard run); skipped without TensorFlow."""
    if not tensorflow_available():  # TensorBoard's writer needs it
        return
    import tensorflow as tf

    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        tf.summary.text(tag, text, step=0)
    writer.close()


def git_info():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_description(cpuinfo="/proc/cpuinfo"):
    """The CPU a run trained on, e.g. "Intel(R) Xeon(R) Processor (family 6, model 167), 2 cores".

    The same seed and code give different clusterers on different CPUs (the floating-point sums
    differ), so a run's figures need the machine beside them; platform.processor() is often empty.
    """
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores"


def versions():
    """Python, platform, CPU and the versions of the libraries that shape the figures."""
    found = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_description(),
             "backend": keras.backend.backend()}
    for package in ("tensorflow", "keras", "numpy", "scipy", "scikit-learn", "tensorflow-datasets", "h5py"):
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            found[package] = None
    if "tensorflow" in sys.modules:  # installed as tensorflow-cpu or tensorflow[and-cuda]: ask the module
        found["tensorflow"] = sys.modules["tensorflow"].__version__
        found["onednn"] = onednn_enabled()
    found["keras"] = keras.__version__
    return found


def write_projector(output_dir, model, images, labels, info):
    """Penultimate-layer (fc2) embeddings of an evaluation sample, for TensorBoard's Projector."""
    folder = os.path.join(output_dir, "logs", "projector")
    os.makedirs(folder, exist_ok=True)
    embeddings = penultimate_model(model).predict(images, verbose=0)
    np.savetxt(os.path.join(folder, "tensors.tsv"), embeddings, delimiter="\t", fmt="%.5f")
    with open(os.path.join(folder, "metadata.tsv"), "w") as f:
        f.write("fine\tcoarse\n")
        for label in labels:
            f.write(f"{info.fine_names[label]}\t{info.coarse_names[info.fine_to_coarse[label]]}\n")
    with open(os.path.join(folder, "projector_config.pbtxt"), "w") as f:
        f.write('embeddings {\n  tensor_name: "fc2_embedding"\n  tensor_path: "tensors.tsv"\n'
                '  metadata_path: "metadata.tsv"\n}\n')
    # TensorBoard's Projector reads projector_config.pbtxt only in a run's folder, and a folder is a
    # run only where it holds an event file: without this one `--logdir runs` shows no Projector.
    write_text_summary(folder, "projector", f"fc2 embeddings of {len(labels)} evaluation images ({model.name}), "
                                            "labelled with their fine and coarse classes.")


def warn_data_report(splits):
    """One line on stderr per folder with files skipped or class folders found empty (also when the decode was
    cached): train and the val held out of it share their folder's report, and it is said once."""
    seen = set()
    for split in splits:
        key = (split.report or {}).get("folder")
        if key is None or key not in seen:
            _warn_split_report(split)
        seen.add(key)


def _warn_split_report(split):
    report = split.report or {}
    skipped = report.get("skipped_undecodable") or []
    empty = report.get("empty_class_folders") or []
    if skipped or empty:
        example = f" (e.g. {skipped[0]})" if skipped else ""
        print(f"warning: {report.get('folder', split.name)}: skipped {len(skipped)} undecodable or empty image "
              f"file(s){example}; empty class folders: {', '.join(empty) or 'none'}", file=sys.stderr, flush=True)
    nested = report.get("sub_folders") or []
    if nested:  # images are read from each class folder itself, not from folders inside it
        print(f"warning: {report.get('folder', split.name)}: ignored {len(nested)} folder(s) inside class folders "
              f"({', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}): move their images up into the class "
              f"folder to train on them", file=sys.stderr, flush=True)


def data_summary(split):
    report = split.report or {}
    keys = ("source", "folder", "listed", "decoded", "skipped_undecodable", "skipped_missing", "skipped_corrupt",
            "empty_class_folders", "non_image_files", "sub_folders")
    return {k: report[k] for k in keys if k in report}


def hparams(config, eval_split):
    """The hyperparameters a reader compares runs by (the config keys marked `hparam`), flat and
    TensorBoard-typed (str, float, int, bool); `eval_split` is the split the run evaluated on."""
    from keras_cwsn.config import KEYS, PHASE_KEYS, phase_settings, run_phases

    found = {name: key.hparam(config[name]) for name, key in KEYS.items() if key.hparam}
    found["eval_split"] = eval_split  # not "auto": what it resolved to
    for phase in run_phases(config):  # a `ce` run has no cluster phase (nor, on Birdsnap, its settings)
        settings = phase_settings(config, phase)
        found.update({f"{phase}.{name}": key.hparam(settings[name]) for name, key in PHASE_KEYS.items() if key.hparam})
    return found


def write_hparams(output_dir, config, results):
    """The run's hyperparameters and final figures for TensorBoard's HParams dashboard (`logs/hparams`)."""
    if not tensorflow_available():
        return
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(os.path.join(output_dir, "logs", "hparams"))
    with writer.as_default():
        hp.hparams(hparams(config, results["eval_split"]), trial_id=os.path.basename(os.path.abspath(output_dir)))
        for key in FIGURES:
            if key in results:
                tf.summary.scalar(f"final/{key}", results[key], step=0)
    writer.close()


def summarize(per_seed):
    """Mean, sample std (None for one seed) and best (by classification accuracy, as the paper's best of 5) over seeds."""
    summary = {"seeds": [r["seed"] for r in per_seed], "per_seed": {}}
    for key in FIGURES:
        values = [r[key] for r in per_seed if key in r]
        if values:
            summary["per_seed"][key] = values
            summary[key] = {"mean": float(np.mean(values)), "std": seed_std(values), "best": float(np.max(values))}
    best = max(per_seed, key=lambda r: r["classification_accuracy"])
    summary["best_seed"] = best["seed"]
    return summary
