"""Many (variant, seed) runs of one dataset's protocol at once on one GPU, sized to a time budget.

`--dataset` is any registered dataset read from a folder (cifar10 by default; cub42 for the paper's
bird protocol on AlexNet), its network and Appendix B's settings from its config file, as train.py
takes them. A batch-16 LeNet uses a sliver of an H100, so the runs share the card: one process per variant,
whose seeds train together in one compiled program (`train.py --seeds`, docs/many-seeds.md), or
with `--separate-seeds` one process per run. The processes take device memory as they need it
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`, each capped at 0.9 of the card) rather than an equal share
each: AlexNet A clusters at batch 1024, 8x B-D's batch. A variant whose probe fails (diverged, out of
memory) is left out of the plan and the others go on. The device machines lent here allow one command
10 minutes and a session 15 minutes in all, so the script first measures one epoch with every
process running, then picks the number of epochs per phase that fits the budget (the paper's 95 at
most, as `--schedule-scale E/P` with P the paper's epochs for the dataset, 95 for CIFAR-10 and 195
for the birds: learning-rate milestones scale with it) and runs them. On the
budget's end unfinished runs are stopped with SIGTERM: they keep their per-epoch checkpoints, and
the same command resumes them with the same plan (`OUT/plan.json`).

    # on the GPU machine (JAX, no TensorFlow), the archive carried inside the checkout:
    KERAS_BACKEND=jax python scripts/gpu_reproduce.py --archive carry/cifar10-train-jpg.tar.gz \\
        --out /tmp/runs --runs A:0,B:0,C:0,D:0,ce:0,A:1,C:1,D:1 --budget-seconds 540 --collect $OUT/results.tar.gz
    # the official CIFAR-10 split (both archives), and the birds with BatchNorm in AlexNet:
    ... --archive carry/cifar10-train-jpg.tar.gz --archive carry/cifar10-test-jpg.tar.gz ...
    ... --dataset cub42 --archive carry/cub42-jpg.tar.gz --runs C:0,C:1,C:2,ce:0,ce:1,ce:2 ... -- --set alexnet_bn=true

Prints one line per run (status, epochs, figures) and, with --collect, packs every run's small
files (metrics.json, cluster_result.json, histories, plan.json) into one archive, for machines that
return only a few files. Needs only what train.py needs on the chosen backend.
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

from keras_cwsn.config import ConfigError, load_config
from keras_cwsn.constants import PHASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The archives of ../shared/data each dataset is read from (train/<class>/*, and test/ for cub42).
ARCHIVES = {"cifar10": ("cifar10/cifar10-train-jpg.tar.gz",), "cub42": ("cub/cub42-jpg.tar.gz",)}
SMALL_FILES = ("metrics.json", "cluster_result.json", "cluster_history.csv", "classify_history.csv", "config.json")
VARIANTS = ("ce", "A", "B", "C", "D")


class PlanError(Exception):
    """A bad argument or a budget nothing fits in: one line, exit 2."""


def parse_runs(text):
    """'A:0,D:1' -> [("A", 0), ("D", 1)]."""
    runs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        variant, _, seed = item.partition(":")
        if variant not in VARIANTS or not seed.isdigit():
            raise PlanError(f"--runs: {item!r} is not VARIANT:SEED with VARIANT in {', '.join(VARIANTS)}")
        runs.append((variant, int(seed)))
    if not runs or len(set(runs)) != len(runs):
        raise PlanError(f"--runs must name each (variant, seed) once; got {text!r}")
    return runs


def dataset_recipe(dataset):
    """(network, the paper's epochs per phase) of a dataset, from its config file."""
    try:
        config = load_config(dataset=dataset)
    except ConfigError as e:
        raise PlanError(f"--dataset {dataset}: {e}") from None
    return config["arch"], max(config[phase]["epochs"] for phase in PHASES)


def default_archives(dataset):
    return [os.path.join(ROOT, "carry", os.path.basename(a)) for a in ARCHIVES.get(dataset, ())]


def unpack(archives, data_dir, dataset="cifar10"):
    """Each archive's train/<class>/* (and test/) under data_dir, once per archive (a marker file remembers)."""
    if not archives:
        raise PlanError(f"--dataset {dataset}: name the archive(s) of its train/<class>/* folder with --archive")
    for archive in archives:
        marker = os.path.join(data_dir, f".unpacked-{os.path.basename(archive)}")
        if os.path.exists(marker):
            continue
        if not os.path.isfile(archive):
            shared = " or ".join(f"../shared/data/{a}" for a in ARCHIVES.get(dataset, ())) or "the archive"
            raise PlanError(f"--archive {archive}: no such file (copy {shared} into an ignored folder of the "
                            f"checkout and carry it)")
        os.makedirs(data_dir, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
        open(marker, "w").close()
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise PlanError(f"{', '.join(archives)}: no train/ folder in the archive(s)")


def warm_cache(data_dir, env, dataset="cifar10"):
    """Decode the images once into the shared cache (train/, and test/ when there), so the parallel runs only read it."""
    splits = ["train"] + (["test"] if os.path.isdir(os.path.join(data_dir, "test")) else [])
    code = ("from keras_cwsn.data import load_split\n"
            f"for split in {splits!r}:\n"
            f"    load_split({dataset!r}, split, data_dir={data_dir!r}, val_per_class=0, verbose=False)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise PlanError(f"cannot read {data_dir} as {dataset}: {done.stderr.strip().splitlines()[-1:]}")


def run_dir(out, variant, seed, prefix):
    """OUT/DATASET-NET-gpu-VARIANT/seed_S, the folders `report` reads."""
    return os.path.join(out, f"{prefix}-{variant}", f"seed_{seed}")


def process_groups(runs, together=True):
    """[(variant, [seeds])]: one train.py per variant with its seeds trained together, or one per run."""
    if not together:
        return [(v, [s]) for v, s in runs]
    grouped = {}
    for v, s in runs:
        grouped.setdefault(v, []).append(s)
    return list(grouped.items())


def launch(variant, seeds, out, args, env, schedule):
    """Start one train.py for `seeds` of `variant` (each seed in its run_dir); its output goes to train.log
    in the folder it is given (the run's, or for several seeds their parent)."""
    if len(seeds) == 1:
        output_dir, seed_flags = run_dir(out, variant, seeds[0], args.prefix), ["--seed", str(seeds[0])]
    else:
        output_dir = os.path.dirname(run_dir(out, variant, seeds[0], args.prefix))
        seed_flags = ["--seeds", ",".join(map(str, seeds))]
    os.makedirs(output_dir, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", args.dataset, "--data-dir", args.data_dir,
               "--variant", variant, *seed_flags, "--output-dir", output_dir, *schedule, *args.train_args]
    with open(os.path.join(output_dir, "train.log"), "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_all(procs, deadline, grace=60):
    """Wait for every process until the deadline, then SIGTERM (SIGKILL after `grace` s) whatever still runs."""
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(1)
    running = [p for p in procs if p.poll() is None]
    for p in running:
        os.killpg(p.pid, signal.SIGTERM)
    stop = time.time() + grace
    for p in running:
        try:
            p.wait(timeout=max(stop - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return len(running)


def history(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probe_figures(runs, out, prefix):
    """From the probe's histories: the slowest second epoch of each phase, each run's seconds spent, and the
    variants whose probe failed (a run without its two epochs per phase: diverged, out of memory, ...)."""
    epochs, spent, failed = {phase: [0.0] for phase in PHASES}, [], {}
    for v, s in runs:
        directory = run_dir(out, v, s, prefix)
        rows = {phase: history(os.path.join(directory, f"{phase}_history.csv")) for phase in PHASES}
        if (v != "ce" and len(rows["cluster"]) < 2) or len(rows["classify"]) < 2:
            log = os.path.join(directory, "train.log")  # one seed's process; several seeds log in the parent
            failed.setdefault(v, log if os.path.exists(log) else os.path.join(os.path.dirname(directory), "train.log"))
            continue
        for phase in PHASES:
            if rows[phase]:
                epochs[phase].append(float(rows[phase][1]["epoch_seconds"]))
        spent.append(sum(float(r["epoch_seconds"]) for phase in rows.values() for r in phase))
    return {phase: max(seconds) for phase, seconds in epochs.items()}, spent, failed


def last_error(log_path):
    """The log's last line that starts with 'error:' (train.py's one-line failures), else its last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["empty log"])[-1]


def probe(runs, args, env, deadline):
    """Seconds of one epoch of each phase (the second: the first compiles) with every process running, the
    slowest run's, start-up seconds, and {variant: log} of the variants whose probe failed (they are left
    out of the plan; the others go on). The phases differ in batch size and steps (AlexNet: 128 and 16)."""
    out = os.path.join(args.out, "probe")
    start = time.time()
    procs = [launch(v, seeds, out, args, env, ["--cluster-epochs", "2", "--classify-epochs", "2"])
             for v, seeds in process_groups(runs, not args.separate_seeds)]
    if wait_all(procs, deadline):
        raise PlanError(f"the probe (2 + 2 epochs per run) did not finish inside the budget; logs in {out}")
    wall = time.time() - start
    slowest, spent, failed = probe_figures(runs, out, args.prefix)
    if not spent:
        raise PlanError("every probe run failed: " + "; ".join(f"{v}: {last_error(log)} ({log})"
                                                               for v, log in failed.items()))
    return slowest["cluster"], slowest["classify"], max(wall - min(spent), 0.0), failed


def choose_epochs(cluster_seconds, classify_seconds, startup_seconds, seconds_left, most, margin=30.0):
    """Epochs per phase that fit: start-up plus E clustering and E classification epochs, under the time left;
    `most` at most (the paper's)."""
    fit = int((seconds_left - startup_seconds - margin) // (cluster_seconds + classify_seconds))
    if fit < 1:
        raise PlanError(f"no epoch fits: an epoch of each phase takes {cluster_seconds:.1f} + {classify_seconds:.1f} s "
                        f"with every run going and start-up {startup_seconds:.0f} s, with {seconds_left:.0f} s left; "
                        f"run fewer at once")
    return min(fit, most)


def summary_rows(out, runs, prefix, left_out=()):
    rows = []
    for v, s in runs:
        directory = run_dir(out, v, s, prefix)
        metrics = os.path.join(directory, "metrics.json")
        if v in left_out:
            rows.append((v, s, "left out: its probe failed", None, None, None))
        elif os.path.exists(metrics):
            with open(metrics) as f:
                m = json.load(f)
            rows.append((v, s, "finished", m.get("cluster_accuracy"), m.get("nmi"), m.get("classification_accuracy")))
        else:
            done = {p: len(history(os.path.join(directory, f"{p}_history.csv"))) for p in PHASES}
            rows.append((v, s, f"stopped (cluster {done['cluster']}, classify {done['classify']} epochs)",
                         None, None, None))
    return rows


def print_summary(rows, plan):
    classify = plan.get("classify_epoch_seconds", plan["epoch_seconds"])  # a plan from before the phases were timed apart
    print(f"\nplan: {plan.get('dataset', 'cifar10')}, {plan['parallel']} processes at once, {plan['epochs']} epochs "
          f"per phase (schedule_scale {plan['schedule_scale']:.4f}), one epoch {plan['epoch_seconds']:.1f} s "
          f"(clustering) and {classify:.1f} s (classification) with all running")
    print(f"{'run':<8}{'status':<44}{'cluster acc':>12}{'NMI':>8}{'class. acc':>12}")
    fmt = lambda x, pct: "-" if x is None else (f"{100 * x:.2f}" if pct else f"{x:.3f}")  # noqa: E731
    together = {v: seeds for v, seeds in plan.get("processes", []) if len(seeds) > 1}
    for v, s, status, acc, nmi, cls in rows:
        how = f"; trained with seeds {','.join(map(str, together[v]))}" if v in together else ""
        print(f"{v}:{s:<6}{status:<44}{fmt(acc, True):>12}{fmt(nmi, False):>8}{fmt(cls, True):>12}{how}")


def collect(out, runs, path, prefix):
    """Every run's small files and the plan in one .tar.gz (the device machine returns a few files only)."""
    tmp = path + ".partial"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(os.path.join(out, "plan.json"), arcname="plan.json")
        for v, s in runs:
            directory = run_dir(out, v, s, prefix)
            for name in SMALL_FILES:
                if os.path.exists(os.path.join(directory, name)):
                    tar.add(os.path.join(directory, name), arcname=os.path.relpath(os.path.join(directory, name), out))
    os.replace(tmp, path)


def load_or_make_plan(runs, groups, args, env, deadline, paper_epochs, most):
    """OUT/plan.json when there (a second call resumes the runs with the same schedule), else probe and plan."""
    plan_path = os.path.join(args.out, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        if plan.get("dataset", "cifar10") != args.dataset:
            raise PlanError(f"{plan_path} plans {plan.get('dataset', 'cifar10')} runs, not {args.dataset}: "
                            f"give this dataset its own --out")
        print(f"[plan] resuming with {plan_path}: {plan['epochs']} epochs per phase", flush=True)
        return plan
    cluster_seconds, classify_seconds, startup, failed = probe(runs, args, env, deadline)
    left_out = {v: last_error(log) for v, log in failed.items()}  # each log read once
    for variant, reason in left_out.items():
        print(f"[plan] {variant} left out: its probe failed: {reason} ({failed[variant]})", flush=True)
    groups = [(v, seeds) for v, seeds in groups if v not in failed]
    epochs = choose_epochs(cluster_seconds, classify_seconds, startup, deadline - time.time(), most)
    plan = {"dataset": args.dataset, "parallel": len(groups), "processes": groups, "epochs": epochs,
            "left_out": left_out,
            "schedule_scale": epochs / paper_epochs, "epoch_seconds": cluster_seconds,
            "classify_epoch_seconds": classify_seconds, "startup_seconds": startup,
            "runs": [f"{v}:{s}" for v, s in runs]}
    with open(plan_path + ".partial", "w") as f:
        json.dump(plan, f, indent=2)
    os.replace(plan_path + ".partial", plan_path)
    print(f"[plan] {args.dataset}: one epoch {cluster_seconds:.1f} s (clustering) and {classify_seconds:.1f} s "
          f"(classification) with {len(groups)} processes going, start-up {startup:.0f} s: "
          f"{epochs} epochs per phase", flush=True)
    return plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", help="a registered dataset read from a folder (cifar10, cub42, ...)")
    p.add_argument("--archive", action="append", default=None,
                   help="a .tar.gz of train/<class>/* (and/or test/<class>/*); repeat for several (default: the "
                        "dataset's archives of ../shared/data, carried under carry/)")
    p.add_argument("--data-dir", default=None, help="where the archive is unpacked (default OUT/data)")
    p.add_argument("--out", required=True, help="runs, plan.json and the probe go here")
    p.add_argument("--runs", default="A:0,B:0,C:0,D:0,ce:0",
                   help="VARIANT:SEED,... (one process per variant, its seeds trained together)")
    p.add_argument("--separate-seeds", action="store_true", help="one process per run (train.py --seed each)")
    p.add_argument("--budget-seconds", type=float, default=540.0, help="wall time for everything, probe included")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per phase at most (default the paper's)")
    p.add_argument("--collect", default=None, help="write the runs' small files to this .tar.gz")
    p.add_argument("--prepare-only", action="store_true",
                   help="unpack the archive and decode it into the cache, then stop (gpu_session.sh does this "
                        "on the CPU while the GPU check runs)")
    p.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = p.parse_args(argv)
    deadline = time.time() + args.budget_seconds
    try:
        runs = parse_runs(args.runs)
        arch, paper_epochs = dataset_recipe(args.dataset)
        args.prefix = f"{args.dataset}-{arch}-gpu"
        most = paper_epochs if args.max_epochs is None else args.max_epochs
        if not 1 <= most <= paper_epochs:
            raise PlanError(f"--max-epochs must be in 1..{paper_epochs} for {args.dataset}; got {args.max_epochs}")
        args.data_dir = os.path.abspath(args.data_dir or os.path.join(args.out, "data"))
        if args.archive or not os.path.isdir(os.path.join(args.data_dir, "train")):  # else a folder given as it is
            unpack(args.archive or default_archives(args.dataset), args.data_dir, args.dataset)
        groups = process_groups(runs, not args.separate_seeds)
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.9",
                   KERAS_CWSN_CACHE=os.environ.get("KERAS_CWSN_CACHE", os.path.join(args.out, "cache")))
        warm_cache(args.data_dir, env, args.dataset)
        if args.prepare_only:
            print(f"[data] {args.data_dir} unpacked and decoded into {env['KERAS_CWSN_CACHE']}", flush=True)
            return 0
        plan = load_or_make_plan(runs, groups, args, env, deadline, paper_epochs, most)
        schedule = ["--schedule-scale", repr(plan["schedule_scale"])]
        procs = [launch(v, seeds, args.out, args, env, schedule) for v, seeds in plan.get("processes", groups)
                 if not all(os.path.exists(os.path.join(run_dir(args.out, v, s, args.prefix), "metrics.json"))
                            for s in seeds)]
        stopped = wait_all(procs, deadline)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary_rows(args.out, runs, args.prefix, plan.get("left_out", {})), plan)
    for variant, reason in plan.get("left_out", {}).items():
        print(f"{variant} left out, its probe: {reason}")
    if args.collect:
        collect(args.out, runs, args.collect, args.prefix)
        print(f"small files of every run: {args.collect}")
    if stopped:
        print(f"{stopped} run(s) stopped at the budget's end; the same command resumes them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
