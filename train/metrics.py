"""Segmentation metrics: weighted Jaccard JC_w (the thesis's headline metric), per-class Dice and
Jaccard, all computed from a confusion matrix ``cm[true, predicted]`` of voxel counts.

A score is a function of counts summed over everything it judges, never a mean of per-batch
scores: on 3D blocks most batches hold no tumor, and a per-batch mean rewards a model that never
marks tumor (each tumor-free batch scores a perfect 1.0 for the class). So

- ``ConfusionMatrix`` (Keras) sums the matrix of the argmax predictions over all batches since
  its last reset (an epoch); its result is the scores of that matrix. In training,
  ``train.callbacks.PooledValidation`` sums the validation matrix over the Horovod ranks and
  puts the scores of the sum into the logs;
- the NumPy functions (``np_*``) do the same for integer label maps (evaluation).

Per class c with ``TP_c = cm[c, c]``, ``FP_c`` the rest of column c, ``FN_c`` the rest of row c:
``JC_c = TP / (TP + FP + FN)``, ``Dice_c = 2TP / (2TP + FP + FN)``, and 1.0 for a class absent
from both truth and prediction (nothing to find, nothing wrongly found).
``JC_w = sum_c w_c JC_c / sum_c w_c`` with the run's class weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from preprocess.kits import CLASS_NAMES, N_CLASSES


def check_class_weights(class_weights: Sequence[float] | None, n_classes: int) -> np.ndarray:
    """The weights as float64 (equal weights for None); clear ValueError if unusable."""
    if class_weights is None:
        return np.ones(n_classes)
    w = np.asarray(class_weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n_classes:
        raise ValueError(f"{w.shape[0]} class weights for {n_classes} classes")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class weights must be finite, non-negative, not all zero; got {w}")
    return w


def score_names(n_classes: int = N_CLASSES) -> list[str]:
    """Names of the scores of a matrix: weighted_jaccard, dice_<class>, jaccard_<class>."""
    names = ["weighted_jaccard"]
    for kind in ("dice", "jaccard"):
        names += [f"{kind}_{_class_name(c)}" for c in range(1, n_classes)]
    return names


def _class_name(index: int) -> str:
    return CLASS_NAMES[index] if index < N_CLASSES else f"class{index}"


# --------------------------------------------------------------------------------------------
# Keras: the confusion matrix of an epoch
# --------------------------------------------------------------------------------------------


def confusion_scores(cm: tf.Tensor, class_weights: tf.Tensor) -> dict[str, tf.Tensor]:
    """Scores of a (C, C) confusion matrix (TensorFlow): JC_w and foreground Dice / Jaccard."""
    cm = tf.cast(cm, tf.float64)
    tp = tf.linalg.diag_part(cm)
    union = tf.reduce_sum(cm, axis=0) + tf.reduce_sum(cm, axis=1)  # 2TP + FP + FN
    dice = tf.where(union > 0, tf.math.divide_no_nan(2.0 * tp, union), 1.0)
    jaccard = tf.where(union > 0, tf.math.divide_no_nan(tp, union - tp), 1.0)
    weights = tf.cast(class_weights, tf.float64)
    scores = {"weighted_jaccard": tf.reduce_sum(weights * jaccard) / tf.reduce_sum(weights)}
    for c in range(1, int(cm.shape[0])):
        scores[f"dice_{_class_name(c)}"] = dice[c]
        scores[f"jaccard_{_class_name(c)}"] = jaccard[c]
    return {name: tf.cast(scores[name], tf.float32) for name in score_names(int(cm.shape[0]))}


class ConfusionMatrix(keras.metrics.Metric):
    """Voxel confusion matrix of the argmax prediction, summed over batches until reset.

    ``y_true`` is one-hot (B, ..., C), ``y_pred`` class probabilities of the same shape (any
    float dtype). The result is a dict of scores (``confusion_scores``), so Keras logs
    ``weighted_jaccard``, ``dice_kidney``, ... (and ``val_...`` for validation) from one
    metric. Counts are float64: exact up to 2^53 voxels.
    """

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        n_classes: int = N_CLASSES,
        name: str = "confusion_matrix",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.n_classes = n_classes
        self.class_weights = [float(w) for w in check_class_weights(class_weights, n_classes)]
        self.confusion = self.add_weight(
            "confusion", shape=(n_classes, n_classes), dtype=tf.float64, initializer="zeros"
        )

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight=None) -> None:
        # Samples that must not count (dataset padding) are not fed at all (train.data), so
        # there are no sample weights to apply; Keras passes None here.
        if sample_weight is not None:
            raise ValueError("ConfusionMatrix counts every voxel fed to it; no sample weights")
        labels = tf.reshape(tf.argmax(y_true, axis=-1), [-1])
        predicted = tf.reshape(tf.argmax(y_pred, axis=-1), [-1])
        batch = tf.math.confusion_matrix(labels, predicted, self.n_classes, dtype=tf.float64)
        self.confusion.assign_add(batch)

    def result(self) -> dict[str, tf.Tensor]:
        return confusion_scores(self.confusion, self.class_weights)

    def reset_state(self) -> None:
        self.confusion.assign(tf.zeros_like(self.confusion))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "class_weights": self.class_weights,
            "n_classes": self.n_classes,
        }


def get_metrics(class_weights: Sequence[float] | None = None) -> list[keras.metrics.Metric]:
    """Metrics for ``model.compile``: one ``ConfusionMatrix`` (JC_w, Dice and Jaccard of kidney
    and tumor, pooled over the epoch)."""
    n_classes = N_CLASSES if class_weights is None else len(class_weights)
    return [ConfusionMatrix(class_weights, n_classes)]


# --------------------------------------------------------------------------------------------
# NumPy, on integer label maps (evaluation)
# --------------------------------------------------------------------------------------------


def _np_labels(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    if t.shape != p.shape:
        raise ValueError(f"label maps differ in shape: {t.shape} vs {p.shape}")
    return t, p


def np_dice(
    labels_true: np.ndarray, labels_pred: np.ndarray, label_set: int | Iterable[int]
) -> float:
    """Dice ``2TP / (2TP + FP + FN)`` of the region ``label in label_set``; 1.0 if both empty.

    KiTS19 scores are ``np_dice(t, p, {1, 2})`` (kidney + tumour) and ``np_dice(t, p, 2)``.
    """
    t, p = _np_labels(labels_true, labels_pred)
    labels = [int(label_set)] if np.isscalar(label_set) else [int(x) for x in label_set]
    in_t, in_p = np.isin(t, labels), np.isin(p, labels)
    den = int(np.count_nonzero(in_t)) + int(np.count_nonzero(in_p))
    return 1.0 if den == 0 else 2.0 * int(np.count_nonzero(in_t & in_p)) / den


def np_confusion_matrix(
    labels_true: np.ndarray, labels_pred: np.ndarray, n_classes: int = N_CLASSES
) -> np.ndarray:
    """Confusion matrix ``cm[t, p]`` (int64, n_classes x n_classes) of two label maps.

    Matrices of several cases or batches can be summed before computing scores from them.
    """
    t, p = _np_labels(labels_true, labels_pred)
    t, p = t.reshape(-1).astype(np.int64), p.reshape(-1).astype(np.int64)
    for arr, what in ((t, "labels_true"), (p, "labels_pred")):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{what} has labels outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def np_jaccard_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class Jaccard from a confusion matrix; 1.0 for a class absent from both."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    den = cm.sum(axis=0) + cm.sum(axis=1) - tp  # TP + FP + FN
    return np.where(den > 0, tp / np.where(den > 0, den, 1.0), 1.0)


def np_dice_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class Dice from a confusion matrix; 1.0 for a class absent from both."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    den = cm.sum(axis=0) + cm.sum(axis=1)  # 2TP + FP + FN
    return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1.0), 1.0)


def np_weighted_jaccard_from_confusion(cm: np.ndarray, weights: Sequence[float]) -> float:
    """JC_w ``sum_c w_c JC_c / sum_c w_c`` from a confusion matrix."""
    cm = np.asarray(cm)
    w = check_class_weights(weights, cm.shape[0])
    return float(np.dot(w, np_jaccard_per_class(cm)) / w.sum())
