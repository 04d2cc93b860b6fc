"""LeNet's layers one at a time, forward + backward: TensorFlow (oneDNN on and off) beside PyTorch.

Run by hand (never a timed test):

    python bench/bench_layers.py --peer-python /tmp/torchenv/bin/python --pause-train-jobs

Issue 12: where the batch-16 LeNet step loses to the PyTorch peer on a given CPU. Each case is one
piece of the network at the paper's batch (16), with the gradients the training step needs
(weights; inputs where a layer below needs them), timed in a loop of `--calls` calls, best of
`--rounds`. Each column runs in its own process, since TensorFlow reads `TF_ENABLE_ONEDNN_OPTS`
once at start-up: TensorFlow with oneDNN on (what train.py runs), with it off (Eigen), and, with
`--peer-python`, the same pieces in PyTorch (that interpreter needs only torch and NumPy).
Two threads in every column, as each gets on CI's 2 cores.
"""

import argparse
import json
import os
import subprocess
import sys
import time

BATCH = 16
# name: (kind, shape of the input (channels last), output channels or units)
CASES = {
    "conv1 5x5 3->20 on 32x32 (dW)": ("conv", (32, 32, 3), 20),
    "conv2 5x5 20->50 on 14x14 (dW, dX)": ("conv_dx", (14, 14, 20), 50),
    "BN + ReLU on 28x28x20": ("bn", (28, 28, 20), None),
    "max-pool 2x2 on 28x28x20": ("pool", (28, 28, 20), None),
    "fc1 1250->500 (dW, dX)": ("dense", (1250,), 500),
    "fc2 500->128 (dW, dX)": ("dense", (500,), 128),
    "BN + ReLU on 500": ("bn", (500,), None),
}


def time_calls(fn, calls, rounds, sync=lambda out: None):
    """Best over rounds of the mean ms per call (20 warm-up calls first)."""
    for _ in range(20):
        sync(fn())
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(out)
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def tensorflow_piece(kind, shape, units, rng):
    """One case in TensorFlow: a tf.function returning the gradients the training step needs, and its tensors."""
    import tensorflow as tf

    variable = lambda shape, scale=1.0: tf.Variable((scale * rng.standard_normal(shape)).astype("float32"))  # noqa
    x = variable((BATCH, *shape))
    if kind in ("conv", "conv_dx"):
        params = [variable((5, 5, shape[-1], units), 0.1)]
        forward = lambda: tf.nn.conv2d(x, params[0], 1, "VALID")  # noqa: E731
    elif kind == "dense":
        params = [variable((shape[0], units), 0.1)]
        forward = lambda: x @ params[0]  # noqa: E731
    elif kind == "bn":
        params = [tf.Variable(tf.ones(shape[-1])), tf.Variable(tf.zeros(shape[-1]))]  # gamma, beta
        axes = list(range(len(shape)))

        def forward():  # Keras 3's training-mode BatchNormalization (moments, then the affine map), then ReLU
            mean, var = tf.nn.moments(x, axes)
            return tf.nn.relu(tf.nn.batch_normalization(x, mean, var, params[1], params[0], 1e-3))
    else:
        params = []
        forward = lambda: tf.nn.max_pool2d(x, 2, 2, "VALID")  # noqa: E731
    wrt = params if kind == "conv" else params + [x]

    @tf.function
    def call():
        with tf.GradientTape() as tape:
            y = forward()
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, wrt)
    return call, forward, x, params


def tensorflow_cases(calls, rounds):
    """Every case's ms per call; the thread count comes from TF_NUM_INTRAOP_THREADS (`run_column` sets it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    rng = np.random.default_rng(0)
    sync = lambda out: [o.numpy() for o in out]  # noqa: E731
    return {name: time_calls(tensorflow_piece(*case, rng)[0], calls, rounds, sync) for name, case in CASES.items()}


def torch_cases(calls, rounds, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def step(kind, shape, units):
        channels_first = (BATCH, shape[-1], *shape[:-1]) if len(shape) == 3 else (BATCH, *shape)
        x = torch.randn(*channels_first, requires_grad=kind != "conv")
        if kind in ("conv", "conv_dx"):
            w = (0.1 * torch.randn(units, shape[-1], 5, 5)).requires_grad_()
            params, forward = [w], lambda: torch.nn.functional.conv2d(x, w)
        elif kind == "dense":
            w = (0.1 * torch.randn(shape[0], units)).requires_grad_()
            params, forward = [w], lambda: x @ w
        elif kind == "bn":
            bn = (torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d)(shape[-1], eps=1e-3)
            params, forward = [bn.weight, bn.bias], lambda: torch.relu(bn(x))
        else:
            params, forward = [], lambda: torch.nn.functional.max_pool2d(x, 2)
        wrt = params if kind == "conv" else params + [x]

        def call():
            y = forward()
            return torch.autograd.grad((y * y).sum(), wrt)
        return call

    return {name: time_calls(step(*case), calls, rounds) for name, case in CASES.items()}


def run_column(python, column, args, onednn=None):
    """One column in a fresh process; its JSON line back."""
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(args.threads))
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    command = [python, os.path.abspath(__file__), "--column", column, "--calls", str(args.calls),
               "--rounds", str(args.rounds), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the {column} column failed ({python}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case (the best is kept)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads in every column")
    p.add_argument("--peer-python", default=None, help="a Python with torch, for the PyTorch column")
    p.add_argument("--pause-train-jobs", action="store_true",
                   help="SIGSTOP background `train.py --dataset cifar10` jobs while the columns run")
    p.add_argument("--column", choices=("tensorflow", "torch"), help=argparse.SUPPRESS)  # a child's one column
    args = p.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--calls, --rounds and --threads must be at least 1")
    if args.column:
        if args.column == "tensorflow":
            print(json.dumps(tensorflow_cases(args.calls, args.rounds)))
        else:
            print(json.dumps(torch_cases(args.calls, args.rounds, args.threads)))
        return 0
    if args.peer_python and not os.path.exists(args.peer_python):
        p.error(f"--peer-python {args.peer_python}: no such file")

    from pause import PauseJobs  # beside this script, which is on sys.path when it runs as `python bench/...`

    with PauseJobs("cifar10" if args.pause_train_jobs else None, max_seconds=600):
        columns = {"TF oneDNN": run_column(sys.executable, "tensorflow", args, onednn="1"),
                   "TF Eigen": run_column(sys.executable, "tensorflow", args, onednn="0")}
        if args.peer_python:
            columns["PyTorch"] = run_column(args.peer_python, "torch", args)
    names = list(columns)
    print(f"batch {BATCH}, {args.threads} threads, ms per forward+backward call (best of {args.rounds} x {args.calls})")
    print(f"{'case':38}" + "".join(f"{n:>12}" for n in names) + ("   oneDNN / PyTorch" if args.peer_python else ""))
    for case in CASES:
        row = f"{case:38}" + "".join(f"{columns[n][case]:12.3f}" for n in names)
        if args.peer_python:
            row += f"{columns['TF oneDNN'][case] / columns['PyTorch'][case]:19.2f}"
        print(row)
    print(f"{'sum':38}" + "".join(f"{sum(columns[n].values()):12.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
