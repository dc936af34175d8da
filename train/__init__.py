"""Training, prediction and evaluation of the segmentation models (TensorFlow, tf-keras, Horovod).

Importing this package selects Keras 2 (tf-keras) for TensorFlow: ``TF_USE_LEGACY_KERAS`` must be
set before TensorFlow is first imported (see ARCHITECTURE.md).
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO/WARNING lines (CUDA plugin registration on GPU-less machines) drown the
# suite's own output; an explicit TF_CPP_MIN_LOG_LEVEL in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
