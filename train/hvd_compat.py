"""The one place where Horovod 0.28.1 is adapted to Keras 2 from tf-keras.

Horovod's Keras callbacks do ``from keras import backend as K``; since TensorFlow 2.16 the
``keras`` package is Keras 3, whose backend lacks ``constant``/``get_value``/``set_value``, so
MetricAverageCallback and the learning-rate callbacks fail ("module 'keras.backend' has no
attribute 'constant'"). Pointing that module attribute at tf-keras's backend fixes them.
``TF_USE_LEGACY_KERAS=1`` (set in train/__init__.py) makes ``tensorflow.keras`` tf-keras, which
Horovod's DistributedOptimizer uses.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import horovod.tensorflow as hvd_tf  # noqa: E402  (object collectives, broadcast_variables)
import horovod.tensorflow.keras as hvd  # noqa: E402
import horovod.tensorflow.keras.callbacks as hvd_callbacks  # noqa: E402
import tf_keras  # noqa: E402

hvd.K = tf_keras.backend
hvd_callbacks.K = tf_keras.backend

__all__ = ["hvd", "hvd_callbacks", "hvd_tf"]
