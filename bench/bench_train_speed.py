"""Train.py's epoch, end to end, at the paper's batch size, side by side with a PyTorch peer.

Runs `keras_cwsn.training.run` (what `train.py` runs: the same data path, callbacks, per-epoch
clustering figures and defaults) on real CIFAR-10 for a few epochs per phase, for each variant and
batch size, and reads each epoch's wall time from the run's own histories (`epoch_seconds`, and
`figures_seconds` for the clustering figures). The first epoch of a phase traces and compiles, so
the figure is the median of the later ones, and the best of them beside it. With `--peer-python`,
the PyTorch yardstick (`../shared/bench/peer_torch_lenet.py`) runs in the same invocation on the
same preprocessed images, and the table gives ours / peer twice: our median epoch against the
peer's figure, and our best epoch against it. The peer reports its best timed block, so the
second is like for like; on a VM whose speed drifts within minutes, it is also the steadier.

    python bench/bench_train_speed.py --data-dir /work/cache/cifar10 \\
        --peer-python /tmp/torchenv/bin/python --peer-script ../shared/bench/peer_torch_lenet.py
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import numpy as np  # noqa: E402

from keras_cwsn.config import load_config, set_value  # noqa: E402
from keras_cwsn.constants import PHASES  # noqa: E402


def epoch_figures(run_dir, phase):
    """(median and best epoch seconds after the first, median figures seconds or None) from a run's history."""
    with open(os.path.join(run_dir, f"{phase}_history.csv")) as f:
        rows = list(csv.DictReader(f))
    later = rows[1:] or rows
    seconds = [float(r["epoch_seconds"]) for r in later]
    figures = [float(r["figures_seconds"]) for r in later if r.get("figures_seconds")]
    return statistics.median(seconds), min(seconds), (statistics.median(figures) if figures else None)


def time_ours(data_dir, variant, batch, epochs, settings):
    """Epoch figures of both phases of one short `run` (a clustering phase for A-D, only classify for ce)."""
    from keras_cwsn.training import run

    config = load_config(dataset="cifar10")
    for key, value in {"data_dir": data_dir, "variant": variant, "embedding_sample": 0, **settings}.items():
        config = set_value(config, key, value)
    for phase in PHASES:
        config = set_value(config, f"{phase}.epochs", epochs)
        config = set_value(config, f"{phase}.batch_size", batch)
    with tempfile.TemporaryDirectory() as out:
        results = run(config, os.path.join(out, "run"), quiet=True)
        phases = {"classify": epoch_figures(os.path.join(out, "run"), "classify")}
        if variant != "ce":
            phases["cluster"] = epoch_figures(os.path.join(out, "run"), "cluster")
    return results["num_train"], phases


def write_peer_arrays(data_dir, path, count):
    """The first `count` preprocessed training images of the same split, for the peer; returns how many."""
    from keras_cwsn.training.inputs import load_run_data

    config = set_value(load_config(dataset="cifar10"), "data_dir", data_dir)
    data = load_run_data(config, quiet=True)
    np.savez(path, x_train=data.train_x[:count], y_train=data.train.labels[:count])
    return min(count, len(data.train))


def time_peer(python, script, arrays, batch, loss, steps, available):
    steps = min(steps, available // batch)  # the peer slices its blocks from the arrays: never past their end
    out = subprocess.run([python, script, "--batch", str(batch), "--loss", loss, "--steps", str(steps),
                          "--arrays", arrays], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder (DIR/train/<class>/*.jpg)")
    p.add_argument("--variants", default="ce,A,D")
    p.add_argument("--batches", default="16,128")
    p.add_argument("--epochs", type=int, default=3, help="epochs per phase (the first is not counted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for our runs, e.g. steps_per_execution=1 (value parsed as JSON)")
    p.add_argument("--peer-python", default=None, help="a Python with torch, to run the peer beside ours")
    p.add_argument("--peer-script", default=os.path.join("..", "shared", "bench", "peer_torch_lenet.py"))
    p.add_argument("--peer-steps", type=int, default=640)
    p.add_argument("--pause-train-jobs", action="store_true",
                   help="SIGSTOP background `train.py --dataset cifar10` jobs while this runs (SIGCONT at the end)")
    args = p.parse_args(argv)
    from pause import PauseJobs

    with PauseJobs("cifar10" if args.pause_train_jobs else None, max_seconds=7200):
        measure(args)


def measure(args):
    settings = {k: json.loads(v) if v[:1] in "0123456789[{tf\"" else v
                for k, v in (item.split("=", 1) for item in args.set)}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; python {' '.join(sys.argv)}", flush=True)
    arrays = available = None
    if args.peer_python:
        arrays = os.path.join(tempfile.mkdtemp(), "peer.npz")
        available = write_peer_arrays(args.data_dir, arrays,
                                      args.peer_steps * max(int(b) for b in args.batches.split(",")))
    print("| variant | batch | phase | epoch s | best epoch s | img/s | figures s (share) | peer img/s (best block) "
          "| ours / peer | best / peer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batches.split(",")):
        for variant in args.variants.split(","):
            num_train, phases = time_ours(args.data_dir, variant, batch, args.epochs, settings)
            peer = {}
            if arrays:
                for phase, loss in (("cluster", "kcl"), ("classify", "ce")):
                    peer[phase] = time_peer(args.peer_python, args.peer_script, arrays, batch, loss, args.peer_steps,
                                            available)
            for phase, (seconds, best, figures) in phases.items():
                rate = num_train / seconds
                share = f"{figures:.2f} ({figures / seconds:.0%})" if figures is not None else "-"
                theirs = peer.get(phase)
                ratios = [f"{num_train / s / theirs:.2f}x" if theirs else "-" for s in (seconds, best)]
                print(f"| {variant} | {batch} | {phase} | {seconds:.2f} | {best:.2f} | {rate:,.0f} | {share} | "
                      f"{theirs or '-'} | {' | '.join(ratios)} |", flush=True)


if __name__ == "__main__":
    main()
