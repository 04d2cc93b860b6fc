"""Fabricated finished runs for the report's tests (test_report_plots.py, test_report_peaks.py): a run folder
with metrics.json and the per-epoch histories as Keras's CSVLogger writes them. Needs neither TensorFlow nor
matplotlib."""

import json
import os

CLUSTER_HEADER = "epoch,learning_rate,loss,val_cluster_accuracy,val_nmi,val_purity"
CLASSIFY_HEADER = "epoch,accuracy,learning_rate,loss,val_accuracy,val_loss"


def write_run(path, variant, seed, cluster=None, classify=None, criterion=None, acc=0.7, eval_split="val", epochs=None, **settings):
    """A finished run folder: metrics.json, and the histories as CSVLogger writes them.

    cluster: [(val_cluster_accuracy, val_nmi), ...] per epoch; classify: [val_accuracy, ...] per epoch.
    epochs: the classification phase's epochs in the config; settings: more config keys (e.g. dataset="folder").
    """
    os.makedirs(path, exist_ok=True)
    config = {"dataset": "cifar10", "arch": "lenet", "double": False, "schedule_scale": 0.5, "variant": variant,
              "eval_split": "val", "weight_decay_mode": "coupled",
              "init": "torch", **settings}
    if epochs is not None:
        config["classify"] = {"epochs": epochs}
    if criterion is not None:
        config["criterion"] = criterion
    acc = classify[-1] if classify else acc
    metrics = {"config": config, "seed": seed, "classification_accuracy": acc, "eval_split": eval_split}
    if cluster is not None:
        metrics.update(cluster_accuracy=cluster[-1][0], nmi=cluster[-1][1], purity=0.5)
        with open(os.path.join(path, "cluster_history.csv"), "w") as f:
            f.write(CLUSTER_HEADER + "\n")
            for epoch, (accuracy, nmi) in enumerate(cluster):
                f.write(f"{epoch},0.01,0.4,{accuracy},{nmi},0.5\n")
    if classify is not None:
        with open(os.path.join(path, "classify_history.csv"), "w") as f:
            f.write(CLASSIFY_HEADER + "\n")
            for epoch, accuracy in enumerate(classify):
                f.write(f"{epoch},0.9,0.01,1.0,{accuracy},1.1\n")
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f)
