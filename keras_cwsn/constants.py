"""Names shared by the library, its command lines and its outputs: each kept here once.

Imports nothing, so light entry points (the Birdsnap downloader, `predict`) can read it.
"""

PHASES = ("cluster", "classify")
# The last fc layer of every network: the fine clusters' (clusterer) or classes' (classifier) logits.
LAST_LAYER = "fc3"
# The clusterer's output at the last layer, whose argmax is a cluster: every clustering figure reads it.
CLUSTER_OUTPUT = f"fine_{LAST_LAYER}"
HEADS = ("hungarian", "copy", "fresh")  # how the warm start moves the clusterer's LAST_LAYER into the classifier
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
INITS = ("torch", "keras")  # how conv and dense weights start: PyTorch's defaults (the paper's) or Keras's
# BatchNormalization (momentum, epsilon): Keras's defaults, or PyTorch's (its momentum 0.1 weighs the new
# batch, i.e. Keras momentum 0.9; epsilon 1e-5), which the paper's code had. PyTorch's running variance
# also takes the unbiased batch variance (n / (n - 1)), Keras's the biased one: that difference stays.
BATCHNORMS = {"keras": (0.99, 1e-3), "torch": (0.9, 1e-5)}
# How SGD applies weight decay: added to the gradient before momentum (PyTorch's, the paper's) or Keras's own.
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EVAL_SPLITS = ("val", "test")
HIERARCHY_SNAPSHOT = "hierarchy_table"  # a run's copy of the user's hierarchy table (.tsv or .csv) beside config.json
# Each network's input size and normalisation, which a folder dataset takes unless its config says otherwise:
# LeNet as on CIFAR-10 (Hsu & Kira's YUV), AlexNet as on Birdsnap (ImageNet mean and std).
NETWORK_INPUTS = {"lenet": ((32, 32), "yuv"), "alexnet": ((224, 224), "imagenet")}
NORMALIZATIONS = ("yuv", "imagenet")
ARCHS = tuple(NETWORK_INPUTS)
# The smallest input side each trunk leaves at least one pixel of (LeNet: two valid 5x5 convs and 2x2
# pools; AlexNet: the 11x11/4 conv and three 3x3/2 pools).
MIN_INPUT_SIDE = {"lenet": 16, "alexnet": 63}
CRITERIA = ("kcl", "mcl")  # the clusterer's pairwise loss: KCL (the paper's) or MCL (Hsu et al., ICLR 2019)
# The figures a run reports, in the order tables show them.
FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy")
PREDICT_BATCH = 256  # the batch of every predict/evaluate pass (no effect on the figures)
# What `tf.io.decode_image` (and Pillow) read; folders are listed with these.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# The SavedModel asset with class names, preprocessing and training figures.
MODEL_INFO_ASSET = "cwsn_model_info.json"
