"""Resume policy: when an output folder holds a run, whether and from which epoch it goes on.

A run killed at any moment (SIGKILL included) and started again with the same command and
`--output-dir` goes on from the last completed epoch of the phase it was in and ends with the same
figures as an uninterrupted run: a finished phase is never redone (`cluster_result.json` marks the
clustering phase done, `metrics.json` the whole run); `Checkpoint` writes every epoch's state;
every epoch's order is seeded by (seed, phase, epoch) (`seeds.epoch_order`).
"""

import contextlib
import csv
import json
import os
import shlex
import shutil
import time

import yaml

from keras_cwsn.atomic import atomic_path, read_json, write_json_atomic
from keras_cwsn.config import RESUMABLE_CHANGES, VALUES_BEFORE_THE_KEY
from keras_cwsn.constants import PHASES
from keras_cwsn.errors import RunError, one_line
from keras_cwsn.training import workers
from keras_cwsn.training.checkpoint import Checkpoint
from keras_cwsn.training.records import table_snapshot


def _flatten(mapping, prefix=""):
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key in (*PHASES, "synthetic"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved, config):
    """{dotted key: (saved, now)} for every setting that differs between two configs."""
    before = {key: value for key, value in VALUES_BEFORE_THE_KEY.items() if key in config}
    old, new = _flatten({**before, **saved}), _flatten(config)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_output_dir(output_dir, overwrite=False, resume=True):
    """Prepare `output_dir`; returns True when it holds an unfinished run to resume.

    A finished run (metrics.json) is refused unless `overwrite`; an unfinished one (config.json, no
    metrics.json) is resumed, or refused when `resume` is False; `overwrite` wipes either and starts over.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunError(f"--output-dir {output_dir} exists and is not a folder.")
    finished = os.path.exists(os.path.join(output_dir, "metrics.json"))
    started = os.path.exists(os.path.join(output_dir, "config.json"))
    if overwrite and (finished or started):
        shutil.rmtree(output_dir)
        finished = started = False
    if finished:
        raise RunError(f"{output_dir} holds a finished run (metrics.json); pass --overwrite to replace it "
                       f"or choose another --output-dir.")
    if started and not resume:
        raise RunError(f"{output_dir} holds an unfinished run; drop --no-resume to continue it, or pass --overwrite "
                       f"to start over.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"Cannot create --output-dir {output_dir}: {one_line(e)}") from None
    return started


@contextlib.contextmanager
def undone_if_nothing_trained(output_dir, fresh):
    """On a failure before any epoch is saved, remove what a fresh start put in `output_dir`.

    A run whose data or model fails to load would otherwise leave a stub (config.json, logs/) that
    TensorBoard lists as a run. `fresh` is `(folder existed, its entries)` from before the start, or
    None for a resumed run, whose files are never touched.
    """
    try:
        yield
    except BaseException:
        if fresh is not None and os.path.isdir(output_dir) and not has_progress(output_dir):
            existed, before = fresh
            for name in set(os.listdir(output_dir)) - before:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
            if not existed and not os.listdir(output_dir):
                os.rmdir(output_dir)
        raise


def has_progress(output_dir):
    """Whether a run's folder holds anything trained: a checkpoint, the clusterer or the finished run."""
    marks = ["cluster_result.json", "metrics.json"] + [os.path.join("backup", p, Checkpoint.METADATA) for p in PHASES]
    return any(os.path.exists(os.path.join(output_dir, m)) for m in marks)


def _set_flag(key, value):
    """The `--set KEY=VALUE` that gives `key` this value (train.py parses the value as YAML), shell-quoted."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("\n...\n").strip()
    return f"--set {shlex.quote(f'{key}={text}')}"


def check_resume_config(output_dir, config):
    """Refuse to resume a run under a config that changes what it computes; returns the allowed changes."""
    path = os.path.join(output_dir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"Cannot read {path} to resume the run: {e}. Pass --overwrite to start over.") from None
    changes = config_changes(saved, config)
    if not has_progress(output_dir):  # nothing trained yet (e.g. the data failed to load): start afresh
        return {}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        flags = " ".join(_set_flag(k, a) for k, (a, _) in refused.items() if a is not None)
        raise RunError(f"{output_dir} holds a run started with other settings ({listed}); rerun with the same "
                       f"settings to resume it{f' ({flags})' if flags else ''}, pass --overwrite to start over, "
                       f"or choose another --output-dir.")
    _check_same_table(output_dir, config)
    return changes


def _check_same_table(output_dir, config):
    """Refuse a hierarchy table whose content changed since the run started: its rows are the class ids."""
    kept = table_snapshot(output_dir)
    if not (kept and config.get("hierarchy")):
        return
    try:
        with open(config["hierarchy"], "rb") as now, open(kept, "rb") as then:
            same = now.read() == then.read()
    except OSError as e:
        raise RunError(f"Cannot compare the hierarchy table with the run's copy to resume it: {one_line(e)}") from None
    if not same:
        raise RunError(f"{config['hierarchy']} has changed since {output_dir} started (the run keeps the table it "
                       f"started with as {kept}; its rows are the class ids): resume with --hierarchy {kept}, "
                       f"or pass --overwrite to start over with the new table.")


def read_resume_epoch(backup_dir, strategy):
    """Epochs completed by the phase's last checkpoint (0 if none), agreed on by every worker."""
    meta = Checkpoint.read(backup_dir)
    epoch = int(meta["epoch"]) if meta else 0
    agreed = workers.agree_min(strategy, epoch)
    if agreed and "checkpoints" not in meta:  # e.g. plain BackupAndRestore's {"epoch", "batch"} of early versions
        raise RunError(f"Cannot resume from epoch {agreed}: {os.path.join(backup_dir, Checkpoint.METADATA)} is in a "
                       f"format this version does not read (no 'checkpoints' entry; written by an older keras-cwsn?); "
                       f"pass --overwrite to start over.")
    if agreed and agreed not in Checkpoint.available(backup_dir):
        raise RunError(f"Cannot resume from epoch {agreed}: its checkpoint is missing from {backup_dir}; "
                       f"pass --overwrite to start over.")
    return agreed


def truncate_history(path, first_epoch):
    """Keep only the CSV rows of epochs before `first_epoch` (a killed run may have logged an epoch it never saved)."""
    if not os.path.exists(path):
        return
    if first_epoch == 0:
        os.remove(path)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header = rows[0]
    kept = [header] + [r for r in rows[1:] if len(r) == len(header) and r[0].isdigit() and int(r[0]) < first_epoch]
    if len(kept) == len(rows):
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def note_resume(output_dir, phase, epoch, epochs):
    path = os.path.join(output_dir, "resumes.json")
    events = read_json(path, default=[])
    events.append({"phase": phase, "from_epoch": epoch, "epochs": epochs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json_atomic(path, events)
