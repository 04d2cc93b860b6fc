"""Cluster-based Warm-Start Nets: `python train.py --dataset birdsnap34 --variant D`.

Parses the command line, resolves the config (file + flags), and calls `keras_cwsn.training`.
Every error a user can cause exits with status 2 and one line on stderr.

A run killed at any point (Ctrl-C, SIGKILL, a crash) goes on from its last completed epoch when the
same command is run again with the same --output-dir; a finished run is refused unless --overwrite.
"""

import argparse
import os
import sys
import time

from keras_cwsn.constants import NETWORK_INPUTS, PHASES, STRATEGIES
from keras_cwsn.data.registry import datasets_help
from keras_cwsn.errors import UsageError, UserError, one_line, print_error
from keras_cwsn.optional import import_tensorflow_quietly, tensorflow_available


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help=f"{datasets_help()}. Default: synthetic, or folder with --hierarchy")
    p.add_argument("--variant", default=None, help="A, B, C, D (clustering warm start) or ce (baseline); default: the config's")
    p.add_argument("--config", default=None, help="config file (YAML/JSON); default: configs/<dataset>_<net>.yaml")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (CIFAR, cub42, your own: DIR/train/<class>/*, optional DIR/test/<class>/*; "
                        "Birdsnap: the download)")
    p.add_argument("--hierarchy", default=None, metavar="TABLE",
                   help="your own data: a TSV (or .csv) with a row per class folder and a column of coarse labels")
    p.add_argument("--fine-column", default=None, help="the table's column of class-folder names (default: the first)")
    p.add_argument("--coarse-column", default=None, help="the table's column of coarse labels (default: coarse)")
    p.add_argument("--arch", default=None, choices=tuple(NETWORK_INPUTS),
                   help="network; a folder dataset takes its input size, normalisation and Appendix B settings "
                        "from it (default: the config's; alexnet for your own data)")
    p.add_argument("--output-dir", default=None, help="default: runs/<dataset>-<variant>-<timestamp>")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2,3,4 (one sub-folder each)")
    p.add_argument("--separate-seeds", action="store_true",
                   help="with --seeds on JAX: run the seeds one after another through Keras's fit instead of "
                        "together in one compiled program (docs/many-seeds.md)")
    p.add_argument("--seed", type=int, default=None,
                   help="a single seed: the same seed repeats a CPU run exactly (seeded shuffles, deterministic ops)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of both phases")
    p.add_argument("--cluster-epochs", type=int, default=None)
    p.add_argument("--classify-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="batch size of both phases")
    p.add_argument("--lr", type=float, default=None, help="base learning rate of both phases")
    p.add_argument("--schedule-scale", type=float, default=None, help="scale epochs and LR milestones, in (0, 1]")
    p.add_argument("--criterion", default=None, help="pairwise loss: kcl (the paper's, default) or mcl (Hsu et al. 2019)")
    p.add_argument("--head", default=None, help="warm-start head: hungarian, copy or fresh")
    p.add_argument("--double", action="store_true", default=None, help="double every width (Table 4)")
    p.add_argument("--precision", default=None, help="float32, mixed_bfloat16 or mixed_float16")
    p.add_argument("--xla", dest="xla", action="store_true", default=None, help="force XLA on (default: auto)")
    p.add_argument("--no-xla", dest="xla", action="store_false", help="force XLA off")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set cluster.weight_decay=0.001 (value parsed as YAML)")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="tf.distribute strategy: auto (mirrored if >1 GPU, else one), one, mirrored (all local "
                        "GPUs), multiworker (hosts from TF_CONFIG); see docs/training.md")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an unfinished run found in --output-dir from its last completed epoch (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse an unfinished run in --output-dir instead of continuing it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run (finished or not) in --output-dir and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def resolve_config(args):
    """Config file + command-line overrides -> validated config."""
    import yaml

    from keras_cwsn.config import ConfigError, load_config, set_value

    dataset = args.dataset or ("folder" if args.hierarchy and not args.config else "synthetic")
    data_flags = {"data_dir": args.data_dir, "arch": args.arch, "hierarchy": args.hierarchy,
                  "fine_column": args.fine_column, "coarse_column": args.coarse_column}
    if args.config and args.dataset:
        data_flags["dataset"] = args.dataset
    config = load_config(args.config, dataset=None if args.config else dataset, overrides=data_flags)
    flags = {"variant": args.variant, "schedule_scale": args.schedule_scale,
             "head": args.head, "criterion": args.criterion, "double": args.double, "precision": args.precision, "xla": args.xla, "seed": args.seed,
             "strategy": args.strategy}
    for key, value in flags.items():
        if value is not None:
            config = set_value(config, key, value)
    for phase in PHASES:
        for key, value in {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr}.items():
            if value is not None:
                config = set_value(config, f"{phase}.{key}", value)
    for phase, value in (("cluster", args.cluster_epochs), ("classify", args.classify_epochs)):
        if value is not None:
            config = set_value(config, f"{phase}.epochs", value)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE. Received: {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}: the value {value!r} is not valid YAML") from None
        config = set_value(config, key.strip(), parsed)
    return config


def run_name(config):
    """The dataset's name, or the data folder's for your own data (`runs/<name>-<variant>-<time>`)."""
    if config["dataset"] == "folder" and config["data_dir"]:
        return os.path.basename(os.path.normpath(config["data_dir"])) or "folder"
    return config["dataset"]


def parse_seeds(args, config):
    if args.seeds is None:
        return [config["seed"]]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers. Received: {args.seeds!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers >= 0. Received: {args.seeds!r}")
    return seeds


def main(argv=None):
    """Run the command line; returns the exit status (0 done, 2 a user error, reported in one line on stderr)."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        print_error(e)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    import_tensorflow_quietly()
    if args.quiet and tensorflow_available():  # TensorFlow's Python warnings (e.g. predict retracing) too
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    from keras_cwsn.training import run_seeds

    try:
        config = resolve_config(args)
        seeds = parse_seeds(args, config)
        output_dir = args.output_dir or os.path.join(
            "runs", f"{run_name(config)}-{config['variant']}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_seeds(config, seeds, output_dir, overwrite=args.overwrite, quiet=args.quiet, resume=args.resume,
                  together=not args.separate_seeds)
    except (UserError, ValueError) as e:
        print_error(e)
        return 2
    except OSError as e:  # disk full, read-only folder, missing file, ...
        print(f"error: cannot read or write a file: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume from the last completed epoch",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
