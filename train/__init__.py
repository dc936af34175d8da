"""Training, prediction and evaluation of the segmentation models (TensorFlow, tf-keras, Horovod).

Importing this package selects Keras 2 (tf-keras) for TensorFlow: ``TF_USE_LEGACY_KERAS`` must be
set before TensorFlow is first imported (see ARCHITECTURE.md). It also keeps TensorFlow's start-up
quiet: its C++ INFO and WARNING lines are hidden (an explicit ``TF_CPP_MIN_LOG_LEVEL`` in the
environment wins) and so is the CUDA noise of a machine without a GPU (``train.tf_startup``).
"""

import os

from train import tf_startup

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf_startup.install()
