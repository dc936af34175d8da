"""Loss functions of the suite (thesis section 3.6, used as in sections 5.3-5.5); ``get_loss``.

The metrics (JC_w, per-class Dice and Jaccard from a pooled confusion matrix) are in
``train.metrics``. Conventions (see ARCHITECTURE.md):

- ``y_true`` is one-hot, float, shape ``(B, ..., C)``; ``y_pred`` holds softmax probabilities of
  the same shape. Channel order: 0 background, 1 kidney, 2 tumor. Everything works for 2D
  ``(B, H, W, C)`` and 3D ``(B, D, H, W, C)`` tensors (reductions use the dynamic rank).
- Both inputs are cast to float32 first, so a float16 tensor is fine too.
- The soft confusion counts of a class c over a set of voxels i are

      TP_c = sum_i y_ic p_ic,   FP_c = sum_i (1 - y_ic) p_ic,   FN_c = sum_i y_ic (1 - p_ic),

  and every overlap loss is written once from them (``soft_confusion``, ``tversky_index``).
- Overlap losses (Dice, weighted Dice, Jaccard, Tversky, softmax Dice) compute the counts over
  the whole batch (all samples and voxels) per class and return a scalar. Voxel-wise losses (CE,
  weighted CE, balanced BCE, focal) return one value per sample, shape ``(B,)``, the mean over
  that sample's voxels; Keras then averages over the batch.
- Smoothing of the soft overlap indices: ``(TP + s) / (TP + a FP + b FN + s)`` with
  ``s = DEFAULT_SMOOTH = 1.0`` (one voxel). A training batch holds 10^5-10^6 voxels, so s is
  negligible for a class that is present, but it (1) makes a class that is absent from both the
  truth and the prediction score 1 instead of 0/0, and (2) keeps a penalty with a bounded
  gradient on predicted tumour voxels in batches without tumour (with s -> 0 that term is a
  constant 1 and gives no gradient). Pass ``smooth=`` to change it; ``smooth=0`` gives the exact
  thesis formulas but NaN for a class absent from truth and prediction. Where most batches hold
  no tumour (3D blocks, one per rank), penalty (2) dominates and pushes a model towards never
  predicting tumour; ``smooth=1e-5`` (nnU-Net's) leaves such batches to the cross-entropy term
  of ``dice_ce``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

#: Smoothing ``s`` of the soft overlap indices (see the module docstring).
DEFAULT_SMOOTH = 1.0
#: Probabilities are clipped to [LOG_EPSILON, 1 - LOG_EPSILON] before a logarithm (as Keras does).
LOG_EPSILON = 1e-7

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _cast(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Both tensors as float32 (mixed precision: the model output may be float16)."""
    return tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)


def _count_axes(x: tf.Tensor) -> tf.Tensor:
    """Axes to sum over: all but the channel axis."""
    return tf.range(0, tf.rank(x) - 1)


def _mean_over_voxels(x: tf.Tensor) -> tf.Tensor:
    """Mean of a (B, ...) tensor over everything but the batch axis -> (B,)."""
    return tf.reduce_mean(x, axis=tf.range(1, tf.rank(x)))


def _check_weights(class_weights: Sequence[float] | None, what: str = "class_weights"):
    """Validated weights as a float32 tensor, or None for uniform weights."""
    if class_weights is None:
        return None
    w = np.asarray(class_weights, dtype=np.float64).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what} must be finite, non-negative, not all zero; got {class_weights}")
    return tf.constant(w, dtype=tf.float32)


def _check_n_classes(y_pred: tf.Tensor, weights: tf.Tensor | None, what: str) -> None:
    if weights is None:
        return
    n = y_pred.shape[-1]
    if n is not None and n != weights.shape[0]:
        raise ValueError(f"{what} has {weights.shape[0]} entries but y_pred has {n} classes")


def _weighted_class_mean(values: tf.Tensor, weights: tf.Tensor | None) -> tf.Tensor:
    """sum_c w_c v_c / sum_c w_c over the last axis (plain mean if ``weights`` is None)."""
    if weights is None:
        return tf.reduce_mean(values, axis=-1)
    return tf.reduce_sum(values * weights, axis=-1) / tf.reduce_sum(weights)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


# --------------------------------------------------------------------------------------------
# Confusion building blocks
# --------------------------------------------------------------------------------------------


def soft_confusion(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Soft per-class counts ``TP = sum y p``, ``FP = sum (1-y) p``, ``FN = sum y (1-p)``, each
    summed over all samples and voxels (shape ``(C,)``)."""
    y_true, y_pred = _cast(y_true, y_pred)
    axes = _count_axes(y_pred)
    tp = tf.reduce_sum(y_true * y_pred, axis=axes)
    fp = tf.reduce_sum((1.0 - y_true) * y_pred, axis=axes)
    fn = tf.reduce_sum(y_true * (1.0 - y_pred), axis=axes)
    return tp, fp, fn


def tversky_index(
    tp: tf.Tensor,
    fp: tf.Tensor,
    fn: tf.Tensor,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = DEFAULT_SMOOTH,
) -> tf.Tensor:
    """Smoothed Tversky index ``TI = (TP + s) / (TP + alpha FP + beta FN + s)``.

    alpha weighs false positives, beta false negatives. ``alpha = beta = 0.5`` is the Dice
    coefficient, ``alpha = beta = 1`` the Jaccard coefficient (exactly, smoothing included).

    Note on the thesis: eq. 3.8 prints ``TP / (TP + beta FP + (1 - beta) FN)``, while its text
    speaks of two parameters alpha and beta and claims "alpha = beta = 0.5 -> Dice, alpha = beta
    = 1 -> Jaccard". Those claims hold for the two-parameter form of Tversky et al. used here
    (with eq. 3.8, beta = 1 would ignore false negatives). The thesis's third claim, "alpha +
    beta = 1 -> F1", holds only for alpha = beta = 0.5; other pairs with alpha + beta = 1 give
    F-beta-like scores.
    """
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def dice_from_confusion(
    tp: tf.Tensor, fp: tf.Tensor, fn: tf.Tensor, smooth: float = DEFAULT_SMOOTH
) -> tf.Tensor:
    """Dice coefficient (thesis eq. 3.3) ``DC = 2TP / (2TP + FP + FN)``, smoothed.

    Eq. 3.3, ``y p / (y p + 1/2 (1-y) p + 1/2 y (1-p))``, is ``TP / (TP + FP/2 + FN/2)``, the same
    value. Smoothed: ``(TP + s) / (TP + FP/2 + FN/2 + s) = (2TP + 2s) / (2TP + FP + FN + 2s)``.
    """
    return tversky_index(tp, fp, fn, 0.5, 0.5, smooth)


def jaccard_from_confusion(
    tp: tf.Tensor, fp: tf.Tensor, fn: tf.Tensor, smooth: float = DEFAULT_SMOOTH
) -> tf.Tensor:
    """Jaccard coefficient (thesis eq. 3.4) ``JC = TP / (TP + FP + FN)``, smoothed with ``s``."""
    return tversky_index(tp, fp, fn, 1.0, 1.0, smooth)


# --------------------------------------------------------------------------------------------
# Losses (factories returning Keras-compatible ``loss(y_true, y_pred)`` callables)
# --------------------------------------------------------------------------------------------


def _pixel_ce(y_true: tf.Tensor, y_pred: tf.Tensor, weights: tf.Tensor | None) -> tf.Tensor:
    """Per-sample mean over voxels of ``-sum_c w_c y_c log p_c`` -> (B,)."""
    y_true, y_pred = _cast(y_true, y_pred)
    _check_n_classes(y_pred, weights, "class_weights")
    log_p = tf.math.log(tf.clip_by_value(y_pred, LOG_EPSILON, 1.0))
    terms = y_true * log_p if weights is None else y_true * log_p * weights
    return _mean_over_voxels(-tf.reduce_sum(terms, axis=-1))


def crossentropy_loss() -> LossFn:
    """Categorical cross-entropy (CE, the multi-class form of thesis eq. 3.1).

    ``CE = -sum_c y_c log p_c`` per voxel, averaged over the voxels of each sample -> (B,).
    Probabilities are clipped to ``[LOG_EPSILON, 1]``.
    """

    def ce_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return _pixel_ce(y_true, y_pred, None)

    return _named(ce_loss, "ce_loss")


def weighted_crossentropy_loss(class_weights: Sequence[float] | None = None) -> LossFn:
    """Weighted categorical cross-entropy ``-sum_c w_c y_c log p_c`` per voxel -> (B,).

    Averaged over the voxels of each sample (not normalised by the weights, as Keras's
    ``class_weight``). ``class_weights=None`` means all ones, i.e. plain CE.
    """
    weights = _check_weights(class_weights)

    def weighted_ce_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return _pixel_ce(y_true, y_pred, weights)

    return _named(weighted_ce_loss, "weighted_ce_loss")


def balanced_bce_loss(beta: float | Sequence[float] = 0.5) -> LossFn:
    """Balanced binary cross-entropy (BCE, thesis eq. 3.2), applied to every class channel.

    ``-(beta y log p + (1 - beta)(1 - y) log(1 - p))`` per voxel and channel, averaged over
    channels and voxels of each sample -> (B,). ``beta`` (in [0, 1]) weighs the positives; it is
    one number or one per class. ``beta = 0.5`` is half the ordinary binary cross-entropy; for
    a rare class, beta near the fraction of negative voxels balances it.
    """
    b = np.asarray(beta, dtype=np.float64)
    if not np.all(np.isfinite(b)) or np.any(b < 0) or np.any(b > 1):
        raise ValueError(f"beta must lie in [0, 1]; got {beta}")
    b_t = tf.constant(b, dtype=tf.float32)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_true, y_pred = _cast(y_true, y_pred)
        if b_t.shape.rank == 1:
            _check_n_classes(y_pred, b_t, "beta")
        p = tf.clip_by_value(y_pred, LOG_EPSILON, 1.0 - LOG_EPSILON)
        terms = b_t * y_true * tf.math.log(p) + (1.0 - b_t) * (1.0 - y_true) * tf.math.log(1.0 - p)
        return _mean_over_voxels(-terms)

    return _named(loss, "balanced_bce_loss")


def _overlap_loss(
    index: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
    weights: tf.Tensor | None,
    name: str,
) -> LossFn:
    """``1 - sum_c w_c I_c / sum_c w_c`` with I_c an index of the batch-wide soft counts."""

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        _check_n_classes(y_pred, weights, "class_weights")
        tp, fp, fn = soft_confusion(y_true, y_pred)
        return 1.0 - _weighted_class_mean(index(tp, fp, fn), weights)

    return _named(loss, name)


def dice_loss(smooth: float = DEFAULT_SMOOTH) -> LossFn:
    """Dice coefficient loss (DCL, thesis eq. 3.5) ``1 - mean_c DC_c`` -> scalar.

    DC_c is the smoothed soft Dice of class c over the whole batch (``dice_from_confusion``);
    all classes, background included, count equally.
    """
    return _overlap_loss(
        lambda tp, fp, fn: dice_from_confusion(tp, fp, fn, smooth), None, "dice_loss"
    )


def weighted_dice_loss(
    class_weights: Sequence[float] | None = None, smooth: float = DEFAULT_SMOOTH
) -> LossFn:
    """Weighted Dice loss (DCL_w, the suite's default training loss, thesis 5.5) -> scalar.

    ``DCL_w = 1 - sum_c w_c DC_c / sum_c w_c`` with ``DC_c = (TP_c + s) / (TP_c + FP_c/2 +
    FN_c/2 + s)`` from the soft counts over the whole batch per class, ``s = smooth``
    (``DEFAULT_SMOOTH`` = 1 voxel). ``class_weights=None`` means equal weights (= ``dice_loss``).
    """
    weights = _check_weights(class_weights)
    return _overlap_loss(
        lambda tp, fp, fn: dice_from_confusion(tp, fp, fn, smooth), weights, "weighted_dice_loss"
    )


def dice_ce_loss(
    class_weights: Sequence[float] | None = None,
    smooth: float = DEFAULT_SMOOTH,
    ce_weight: float = 1.0,
) -> LossFn:
    """Weighted Dice loss plus categorical cross-entropy: ``DCL_w + ce_weight * CE``.

    Not in the thesis; nnU-Net's default form (soft Dice + CE). The Dice term's class weights
    lift the rare tumor class, while the per-voxel CE term gives every class a gradient from
    the first step; with the weighted Dice alone, short runs here learned kidney or tumor but
    rarely both. Per sample (B,): the batch-wide Dice term is added to each sample's CE.
    """
    if not np.isfinite(ce_weight) or ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0; got {ce_weight}")
    dice = weighted_dice_loss(class_weights, smooth)
    ce = crossentropy_loss()

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return dice(y_true, y_pred) + ce_weight * ce(y_true, y_pred)

    return _named(loss, "dice_ce_loss")


def jaccard_loss(smooth: float = DEFAULT_SMOOTH) -> LossFn:
    """Jaccard coefficient loss (JCL, thesis eq. 3.6) ``1 - mean_c JC_c`` -> scalar.

    ``JC_c = (TP_c + s) / (TP_c + FP_c + FN_c + s)`` from the soft counts over the whole batch.
    """
    return _overlap_loss(
        lambda tp, fp, fn: jaccard_from_confusion(tp, fp, fn, smooth), None, "jaccard_loss"
    )


def tversky_loss(alpha: float = 0.5, beta: float = 0.5, smooth: float = DEFAULT_SMOOTH) -> LossFn:
    """Tversky loss ``1 - mean_c TI_c`` -> scalar.

    ``TI_c = (TP_c + s) / (TP_c + alpha FP_c + beta FN_c + s)`` (``tversky_index``) from the soft
    counts over the whole batch per class. alpha penalises false positives, beta false negatives;
    the default alpha = beta = 0.5 equals ``dice_loss`` (the thesis's shipped 2D run), alpha =
    beta = 1 equals ``jaccard_loss``. See ``tversky_index`` for how this reads the thesis's
    eq. 3.8, which prints beta and (1 - beta) instead of alpha and beta.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0; got {alpha}, {beta}")
    return _overlap_loss(
        lambda tp, fp, fn: tversky_index(tp, fp, fn, alpha, beta, smooth), None, "tversky_loss"
    )


def softmax_dice_loss(
    alpha: float = 1.0, beta: float = 1.0, smooth: float = DEFAULT_SMOOTH
) -> LossFn:
    """Softmax Dice loss (SDL, thesis eq. 3.7) ``alpha CE + beta DCL`` -> scalar.

    CE is the batch mean of ``crossentropy_loss`` and DCL is ``dice_loss(smooth)``.
    """
    ce = crossentropy_loss()
    dcl = dice_loss(smooth)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return alpha * tf.reduce_mean(ce(y_true, y_pred)) + beta * dcl(y_true, y_pred)

    return _named(loss, "softmax_dice_loss")


def focal_loss(gamma: float = 2.0, alpha: Sequence[float] | None = None) -> LossFn:
    """Focal loss (Lin et al. 2017), multi-class form -> (B,).

    ``FL = -sum_c alpha_c (1 - p_c)^gamma y_c log p_c`` per voxel, averaged over the voxels of
    each sample. ``alpha=None`` means all ones; gamma = 0 with alpha = None is plain CE.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    weights = _check_weights(alpha, "alpha")

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_true, y_pred = _cast(y_true, y_pred)
        _check_n_classes(y_pred, weights, "alpha")
        p = tf.clip_by_value(y_pred, LOG_EPSILON, 1.0)
        terms = y_true * tf.pow(1.0 - p, gamma) * tf.math.log(p)
        if weights is not None:
            terms = terms * weights
        return _mean_over_voxels(-tf.reduce_sum(terms, axis=-1))

    return _named(loss, "focal_loss")


#: Loss name -> factory. ``get_loss`` is the intended entry point.
LOSSES: dict[str, Callable[..., LossFn]] = {
    "ce": crossentropy_loss,
    "weighted_ce": weighted_crossentropy_loss,
    "balanced_bce": balanced_bce_loss,
    "dice": dice_loss,
    "weighted_dice": weighted_dice_loss,
    "dice_ce": dice_ce_loss,
    "jaccard": jaccard_loss,
    "softmax_dice": softmax_dice_loss,
    "tversky": tversky_loss,
    "focal": focal_loss,
}
DEFAULT_LOSS = "weighted_dice"

# Losses that use the class weights, and the factory parameter that receives them.
_CLASS_WEIGHT_PARAM = {
    "weighted_ce": "class_weights",
    "weighted_dice": "class_weights",
    "dice_ce": "class_weights",
    "focal": "alpha",
}


def get_loss(
    name: str = DEFAULT_LOSS, class_weights: Sequence[float] | None = None, **params
) -> LossFn:
    """Loss by name: one of ``LOSSES`` (default ``"weighted_dice"``, DCL_w).

    ``class_weights`` (one per class, background first) are used by ``weighted_ce``,
    ``weighted_dice``, ``dice_ce`` (its Dice term) and ``focal`` (as its alpha, unless
    ``alpha`` is given); the other losses are unweighted by definition and ignore them.
    ``params`` go to the factory (e.g. ``smooth``, ``alpha``, ``beta``, ``gamma``,
    ``ce_weight``); unknown parameters raise TypeError.

    Raises:
        ValueError: unknown loss name (the message lists the valid names).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    param = _CLASS_WEIGHT_PARAM.get(key)
    if param is not None and class_weights is not None:
        params.setdefault(param, class_weights)
    return LOSSES[key](**params)
