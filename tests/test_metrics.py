"""Tests of train/metrics.py: scores of a confusion matrix, pooled over an epoch (Keras metric)
and over label maps (NumPy).

The hand case is one 2x2 image, classes (background, kidney, tumor):

    labels [[0, 1], [2, 1]], argmax of the prediction [[0, 1], [2, 0]] (the last pixel is wrong)

    cm[true, predicted] = [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    JC: background 1/2, kidney 1/2, tumor 1; Dice: 2/3, 2/3, 1.
    JC_w with weights (1, 2, 3): (0.5 + 2 * 0.5 + 3 * 1) / 6 = 0.75.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# train/__init__.py sets TF_USE_LEGACY_KERAS before train.metrics imports TensorFlow
import train.metrics as M

tf = M.tf

LABELS = np.array([[0, 1], [2, 1]])
PROBS = np.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]])
Y_TRUE = np.eye(3, dtype=np.float32)[LABELS][None]  # (1, 2, 2, 3)
Y_PRED = PROBS.astype(np.float32)[None]
W = [1.0, 2.0, 3.0]


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[labels]


def scores_of(batches: list[tuple[np.ndarray, np.ndarray]], weights=W) -> dict[str, float]:
    """Feed (y_true, y_pred) batches through a ConfusionMatrix, as Keras does in an epoch."""
    metric = M.ConfusionMatrix(weights)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    return {k: float(v) for k, v in metric.result().items()}


def per_batch_mean(batches: list[tuple[np.ndarray, np.ndarray]], weights=W) -> float:
    """The old monitored value: JC_w of each batch on its own, averaged over the batches."""
    values = [
        M.np_weighted_jaccard_from_confusion(
            M.np_confusion_matrix(t.argmax(-1), p.argmax(-1)), weights
        )
        for t, p in batches
    ]
    return float(np.mean(values))


def test_hand_case_keras_and_numpy():
    scores = scores_of([(Y_TRUE, Y_PRED)])
    assert list(scores) == M.score_names()
    assert scores["weighted_jaccard"] == pytest.approx(0.75)
    assert scores["dice_kidney"] == pytest.approx(2 / 3)
    assert scores["dice_tumor"] == pytest.approx(1.0)
    assert scores["jaccard_kidney"] == pytest.approx(0.5)
    assert scores["jaccard_tumor"] == pytest.approx(1.0)
    assert scores_of([(Y_TRUE, Y_PRED)], None)["weighted_jaccard"] == pytest.approx(2 / 3)

    t, p = LABELS.reshape(-1), np.array([0, 1, 2, 0])
    cm = M.np_confusion_matrix(t, p)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(M.np_jaccard_per_class(cm), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(M.np_dice_per_class(cm), [2 / 3, 2 / 3, 1.0])
    assert M.np_weighted_jaccard_from_confusion(cm, W) == pytest.approx(0.75)
    # kidney + tumour region (label > 0): truth {1, 2, 3}, prediction {1, 2}: Dice 4 / 5
    assert M.np_dice(t, p, {1, 2}) == pytest.approx(0.8)
    assert M.np_dice(t, p, 2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.np_dice(t, p[:3], 1)
    with pytest.raises(ValueError):
        M.np_confusion_matrix(t, np.array([0, 1, 2, 3]))


def test_absent_class_scores_one_and_false_positives_zero():
    no_tumor = one_hot(np.array([[0, 1], [1, 0]]))[None]
    assert scores_of([(no_tumor, no_tumor)])["dice_tumor"] == 1.0
    pred = no_tumor.copy()
    pred[0, 0, 0] = [0.1, 0.1, 0.8]  # one pixel of tumour where there is none
    scores = scores_of([(no_tumor, pred)], None)
    assert scores["dice_tumor"] == 0.0 and scores["jaccard_tumor"] == 0.0
    # background TP 1 FN 1 -> 0.5, kidney 1, tumor 0 -> mean 0.5
    assert scores["weighted_jaccard"] == pytest.approx(0.5)
    assert M.np_dice(np.zeros((3, 3)), np.zeros((3, 3)), 2) == 1.0


def test_matrix_sums_batches_and_matches_numpy_3d():
    rng = np.random.default_rng(5)
    batches = []
    for _ in range(3):
        labels = rng.integers(0, 3, (2, 3, 6, 5))
        logits = rng.normal(size=(2, 3, 6, 5, 3)).astype(np.float32)
        batches.append((one_hot(labels), tf.nn.softmax(logits).numpy()))
    metric = M.ConfusionMatrix(W)
    for y_true, y_pred in batches:
        metric.update_state(y_true, tf.constant(y_pred, tf.float16))  # any float dtype
    cm = sum(M.np_confusion_matrix(t.argmax(-1), p.argmax(-1)) for t, p in batches)
    np.testing.assert_array_equal(metric.confusion.numpy(), cm)
    scores = {k: float(v) for k, v in metric.result().items()}
    assert scores["weighted_jaccard"] == pytest.approx(
        M.np_weighted_jaccard_from_confusion(cm, W), abs=1e-6
    )
    assert scores["dice_kidney"] == pytest.approx(M.np_dice_per_class(cm)[1], abs=1e-6)
    assert scores["jaccard_tumor"] == pytest.approx(M.np_jaccard_per_class(cm)[2], abs=1e-6)
    metric.reset_state()
    assert not np.any(metric.confusion.numpy())


def test_never_tumor_no_longer_scores_best_on_3d_blocks():
    """3D validation: four blocks of 4x8x8 voxels with kidney, one of them with a small tumour.

    Model A never marks tumour (kidney perfect). Model B finds the tumour but also marks a few
    tumour voxels in each tumour-free block. Per batch (one block per batch, as 3D training runs
    on one block per rank), A scores better: every tumour-free batch gives it a perfect tumour
    class, B a zero. Pooled over the epoch, B is better: it is the only one that finds tumour.
    """
    weights = [0.3, 10.0, 100.0]  # balanced weights lift the rare tumour class
    blocks, never_tumor, finds_tumor = [], [], []
    for b in range(4):
        labels = np.zeros((1, 4, 8, 8), int)
        labels[:, :, 2:6, 2:6] = 1
        if b == 0:
            labels[:, 1:3, 3:5, 3:5] = 2  # 8 tumour voxels
        blocks.append(labels)
        a = np.where(labels == 2, 1, labels)  # tumour called kidney
        never_tumor.append(a)
        fp = labels.copy()
        if b > 0:
            fp[:, 0, 0, :2] = 2  # two false-positive tumour voxels in background
        finds_tumor.append(fp)
    batches_a = [(one_hot(t), one_hot(p)) for t, p in zip(blocks, never_tumor, strict=True)]
    batches_b = [(one_hot(t), one_hot(p)) for t, p in zip(blocks, finds_tumor, strict=True)]
    assert per_batch_mean(batches_a, weights) > per_batch_mean(batches_b, weights)
    pooled_a = scores_of(batches_a, weights)
    pooled_b = scores_of(batches_b, weights)
    assert pooled_a["dice_tumor"] == 0.0 and pooled_b["dice_tumor"] > 0.5
    assert pooled_b["weighted_jaccard"] > pooled_a["weighted_jaccard"]


def test_invalid_weights():
    with pytest.raises(ValueError, match="not all zero"):
        M.ConfusionMatrix([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        M.ConfusionMatrix([1.0, 2.0])
    with pytest.raises(ValueError):
        M.np_weighted_jaccard_from_confusion(np.eye(3), [1.0, math.nan, 1.0])
    with pytest.raises(ValueError, match="no sample weights"):
        M.ConfusionMatrix(W).update_state(Y_TRUE, Y_PRED, sample_weight=np.ones(1))


# tf_keras's fit() itself calls random.randint with a float bound (not this suite's code)
@pytest.mark.filterwarnings("ignore:non-integer arguments to randrange:DeprecationWarning")
def test_keras_logs_scores_pooled_over_the_epoch():
    import tf_keras as keras

    from train.losses import get_loss

    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, keras.layers.Conv2D(3, 1, activation="softmax")(inp))
    model.compile("adam", loss=get_loss("weighted_dice", W), metrics=M.get_metrics(W))
    rng = np.random.default_rng(10)
    x = rng.random((6, 4, 4, 1)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, size=(6, 4, 4)))
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0, validation_data=(x, y))
    for name in M.score_names():
        assert np.isfinite(history.history[name][0]) and f"val_{name}" in history.history
    # three batches of two: the metric is the score of the summed matrix, not a batch mean
    results = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    cm = M.np_confusion_matrix(y.argmax(-1), model.predict(x, verbose=0).argmax(-1))
    assert results["weighted_jaccard"] == pytest.approx(
        M.np_weighted_jaccard_from_confusion(cm, W), abs=1e-6
    )
    assert results["dice_kidney"] == pytest.approx(M.np_dice_per_class(cm)[1], abs=1e-6)
