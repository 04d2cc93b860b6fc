"""Names shared by the library, its command lines and its outputs: each kept here once.

Imports nothing, so light entry points (the Birdsnap downloader, `predict`) can read it.
"""

PHASES = ("cluster", "classify")
HEADS = ("hungarian", "copy", "fresh")  # how the warm start moves the clusterer's fc3 into the classifier
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EVAL_SPLITS = ("val", "test")
# Each network's input size and normalisation, which a folder dataset takes unless its config says otherwise:
# LeNet as on CIFAR-10 (Hsu & Kira's YUV), AlexNet as on Birdsnap (ImageNet mean and std).
NETWORK_INPUTS = {"lenet": ((32, 32), "yuv"), "alexnet": ((224, 224), "imagenet")}
NORMALIZATIONS = ("yuv", "imagenet")
CRITERIA = ("kcl", "mcl")  # the clusterer's pairwise loss: KCL (the paper's) or MCL (Hsu et al., ICLR 2019)
# The figures a run reports, in the order tables show them.
FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy")
# What `tf.io.decode_image` (and Pillow) read; folders are listed with these.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Config keys added after runs were already being made, with what the code did before each existed:
# a saved config without the key ran that way (a run from before `weight_decay_mode` used Keras's
# decoupled decay). Resuming and the results table both read old configs through this.
VALUES_BEFORE_THE_KEY = {"criterion": "kcl", "weight_decay_mode": "decoupled", "init": "keras", "batchnorm": "keras",
                         "last_layer_weight_decay": True}
# The SavedModel asset with class names, preprocessing and training figures.
MODEL_INFO_ASSET = "cwsn_model_info.json"
