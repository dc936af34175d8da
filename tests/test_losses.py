"""Tests of train/losses.py: hand-computed values, identities, gradients, shapes, registry.

The hand-computed cases use one 2x2 image (batch 1), classes (background, kidney, tumor):

    labels        probabilities (bg, kidney, tumor)     argmax
    [[0, 1],      p0 = (0.7, 0.2, 0.1)  p1 = (0.1, 0.8, 0.1)     [[0, 1],
     [2, 1]]      p2 = (0.2, 0.2, 0.6)  p3 = (0.5, 0.3, 0.2)      [2, 0]]   (p3 is wrong)

Soft counts per class (TP = sum y p, FP = sum (1-y) p, FN = sum y (1-p)):
    background: y = (1,0,0,0), p = (.7,.1,.2,.5): TP = .7,          FP = .1+.2+.5 = .8, FN = .3
    kidney:     y = (0,1,0,1), p = (.2,.8,.2,.3): TP = .8+.3 = 1.1, FP = .2+.2 = .4, FN = .2+.7 = .9
    tumor:      y = (0,0,1,0), p = (.1,.1,.6,.2): TP = .6,          FP = .1+.1+.2 = .4, FN = .4
The metrics (train/metrics.py) have tests of their own (tests/test_metrics.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# train/__init__.py sets TF_USE_LEGACY_KERAS before train.losses imports TensorFlow
import train.losses as L

tf = L.tf

LABELS = np.array([[0, 1], [2, 1]])
PROBS = np.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]])
Y_TRUE = np.eye(3, dtype=np.float32)[LABELS][None]  # (1, 2, 2, 3)
Y_PRED = PROBS.astype(np.float32)[None]  # (1, 2, 2, 3)
W = [1.0, 2.0, 3.0]


def val(x) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


def close(actual, expected, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(val(actual), expected, rtol=tol, atol=tol)


def random_pair(shape: tuple[int, ...], seed: int = 0, scale: float = 2.0):
    """Random one-hot truth and softmax prediction of the given (B, ..., C) shape."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    y_true = np.eye(shape[-1], dtype=np.float32)[labels]
    logits = rng.normal(scale=scale, size=shape)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return y_true, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------ confusion building blocks


def test_soft_confusion_hand_values():
    tp, fp, fn = L.soft_confusion(Y_TRUE, Y_PRED)
    close(tp, [0.7, 1.1, 0.6])
    close(fp, [0.8, 0.4, 0.4])
    close(fn, [0.3, 0.9, 0.4])


# ------------------------------------------------------------------ losses, hand-computed


def test_dice_loss_hand_value():
    # smooth 0: DC = 2TP / (2TP + FP + FN)
    #   bg 1.4 / (1.4 + .8 + .3) = .56; kidney 2.2 / (2.2 + .4 + .9) = .6285714;
    #   tumor 1.2 / (1.2 + .4 + .4) = .6; mean .5961905 -> DCL = .4038095
    close(L.dice_loss(smooth=0.0)(Y_TRUE, Y_PRED), 0.4038095)
    # default smooth s = 1: DC = (TP + 1) / (TP + FP/2 + FN/2 + 1)
    #   bg 1.7 / 2.25 = .7555556; kidney 2.1 / 2.75 = .7636364; tumor 1.6 / 2.0 = .8
    #   mean .7730640 -> DCL = .2269360
    close(L.dice_loss()(Y_TRUE, Y_PRED), 0.2269360)


def test_weighted_dice_loss_hand_value():
    # weights (1, 2, 3): (.56 + 2 * .6285714 + 3 * .6) / 6 = 3.6171429 / 6 = .6028571
    close(L.weighted_dice_loss(W, smooth=0.0)(Y_TRUE, Y_PRED), 1 - 0.6028571)
    # weights (1, 0, 0): background only -> 1 - .56
    close(L.weighted_dice_loss([1, 0, 0], smooth=0.0)(Y_TRUE, Y_PRED), 0.44)


def test_jaccard_loss_hand_value():
    # JC = TP / (TP + FP + FN): bg .7 / 1.8 = .3888889; kidney 1.1 / 2.4 = .4583333;
    # tumor .6 / 1.4 = .4285714; mean .4252646 -> JCL = .5747354
    close(L.jaccard_loss(smooth=0.0)(Y_TRUE, Y_PRED), 0.5747354)


def test_tversky_loss_hand_values_alpha_weighs_false_positives():
    # alpha .3 (FP), beta .7 (FN): bg .7 / (.7 + .24 + .21) = .6086957;
    # kidney 1.1 / (1.1 + .12 + .63) = .5945946; tumor .6 / (.6 + .12 + .28) = .6
    # mean .6010968 -> loss .3989032
    close(L.tversky_loss(0.3, 0.7, smooth=0.0)(Y_TRUE, Y_PRED), 0.3989032)
    # alpha .7, beta .3: bg .7 / (.7 + .56 + .09) = .5185185; kidney 1.1 / (1.1 + .28 + .27)
    # = .6666667; tumor .6 / 1.0 = .6; mean .5950617 -> loss .4049383
    close(L.tversky_loss(0.7, 0.3, smooth=0.0)(Y_TRUE, Y_PRED), 0.4049383)


def test_crossentropy_hand_value():
    # -ln p_true per pixel: -ln .7 = .3566749, -ln .8 = .2231436, -ln .6 = .5108256,
    # -ln .3 = 1.2039728; mean = 2.2946169 / 4 = .5736542
    ce = L.crossentropy_loss()(Y_TRUE, Y_PRED)
    assert tuple(ce.shape) == (1,)
    close(ce, [0.5736542])


def test_dice_ce_is_weighted_dice_plus_scaled_crossentropy():
    # weighted Dice (1, 2, 3) 1 - .6028571 = .3971429 (above) + CE .5736542 (above)
    close(L.dice_ce_loss(W, smooth=0.0)(Y_TRUE, Y_PRED), [0.3971429 + 0.5736542])
    close(L.dice_ce_loss(W, smooth=0.0, ce_weight=0.5)(Y_TRUE, Y_PRED), [0.3971429 + 0.2868271])
    close(L.get_loss("dice_ce", W, smooth=0.0)(Y_TRUE, Y_PRED), [0.3971429 + 0.5736542])
    with pytest.raises(ValueError, match="ce_weight"):
        L.dice_ce_loss(W, ce_weight=-1.0)


def test_weighted_crossentropy_hand_value():
    # weights (1, 2, 3) by true class: .3566749 + 2 * .2231436 + 3 * .5108256 + 2 * 1.2039728
    # = 4.7433844; / 4 pixels = 1.1858461
    close(L.weighted_crossentropy_loss(W)(Y_TRUE, Y_PRED), [1.1858461])


def test_balanced_bce_hand_value():
    # beta = .25: positives .25 * sum(-ln p_true) = .25 * 2.2946169 = .5736542
    # negatives .75 * sum(-ln(1 - p)) over the 8 wrong-class entries
    #   (.2 .1 | .1 .1 | .2 .2 | .5 .2): 4 * .2231436 + 3 * .1053605 + .6931472 = 1.9018031
    #   -> .75 * 1.9018031 = 1.4263523; total 2.0000065 over 12 entries = .1666672
    close(L.balanced_bce_loss(0.25)(Y_TRUE, Y_PRED), [0.1666672])
    # beta = 1 per class: positives only, 2.2946169 / 12 = .1912181
    close(L.balanced_bce_loss([1.0, 1.0, 1.0])(Y_TRUE, Y_PRED), [0.1912181])
    # beta per class (1, 0, 0): background positives .3566749, negatives of kidney and tumor:
    #   kidney (p = .2, .2 wrong): 2 * .2231436; tumor (.1, .1, .2): 2 * .1053605 + .2231436
    #   total .3566749 + .4462871 + .4338646 = 1.2368266; / 12 = .1030689
    close(L.balanced_bce_loss([1.0, 0.0, 0.0])(Y_TRUE, Y_PRED), [0.1030689])


def test_focal_loss_hand_value():
    # gamma 2: (1 - p)^2 (-ln p): .09 * .3566749 + .04 * .2231436 + .16 * .5108256
    #   + .49 * 1.2039728 = .0321007 + .0089257 + .0817321 + .5899467 = .7127052; / 4 = .1781763
    close(L.focal_loss()(Y_TRUE, Y_PRED), [0.1781763])
    # alpha (1, 2, 3) by true class: .0321007 + 2 * .0089257 + 3 * .0817321 + 2 * .5899467
    #   = 1.4750418; / 4 = .3687605
    close(L.focal_loss(alpha=W)(Y_TRUE, Y_PRED), [0.3687605])


def test_softmax_dice_loss_hand_value():
    # .5 * CE + 2 * DCL = .5 * .5736542 + 2 * .4038095 = 1.0944461
    close(L.softmax_dice_loss(0.5, 2.0, smooth=0.0)(Y_TRUE, Y_PRED), 1.0944461)


# ------------------------------------------------------------------ identities


def test_tversky_half_half_is_dice_and_one_one_is_jaccard():
    y_true, y_pred = random_pair((2, 5, 5, 3), seed=1)
    for smooth in (0.0, 1.0):
        close(
            L.tversky_loss(0.5, 0.5, smooth)(y_true, y_pred),
            val(L.dice_loss(smooth)(y_true, y_pred)),
        )
        close(
            L.tversky_loss(1.0, 1.0, smooth)(y_true, y_pred),
            val(L.jaccard_loss(smooth)(y_true, y_pred)),
        )
    # and not trivially: Dice and Jaccard losses differ here
    assert abs(val(L.dice_loss()(y_true, y_pred)) - val(L.jaccard_loss()(y_true, y_pred))) > 0.05


def test_dice_matches_eq_3_3_and_f1():
    # eq. 3.3 DC = y.p / (y.p + 1/2 (1-y) p + 1/2 y (1-p)), written out in NumPy on random data
    y_true, y_pred = random_pair((2, 4, 4, 3), seed=2)
    yp = (y_true * y_pred).sum(axis=(0, 1, 2))
    eq33 = yp / (
        yp
        + 0.5 * ((1 - y_true) * y_pred).sum((0, 1, 2))
        + 0.5 * (y_true * (1 - y_pred)).sum((0, 1, 2))
    )
    close(L.dice_loss(smooth=0.0)(y_true, y_pred), 1 - eq33.mean())


def test_softmax_dice_is_alpha_ce_plus_beta_dice():
    y_true, y_pred = random_pair((3, 4, 4, 3), seed=3)
    alpha, beta = 0.3, 1.7
    ce = val(L.crossentropy_loss()(y_true, y_pred)).mean()
    dcl = val(L.dice_loss()(y_true, y_pred))
    close(L.softmax_dice_loss(alpha, beta)(y_true, y_pred), alpha * ce + beta * dcl)


def test_unweighted_special_cases():
    y_true, y_pred = random_pair((2, 4, 4, 3), seed=4)
    ce = val(L.crossentropy_loss()(y_true, y_pred))
    close(L.focal_loss(gamma=0.0)(y_true, y_pred), ce)
    close(L.weighted_crossentropy_loss(None)(y_true, y_pred), ce)
    close(L.weighted_crossentropy_loss([1, 1, 1])(y_true, y_pred), ce)
    close(L.weighted_dice_loss(None)(y_true, y_pred), val(L.dice_loss()(y_true, y_pred)))
    close(L.weighted_dice_loss([5, 5, 5])(y_true, y_pred), val(L.dice_loss()(y_true, y_pred)))
    # non-uniform weights do change the value
    assert (
        abs(val(L.weighted_dice_loss(W)(y_true, y_pred)) - val(L.dice_loss()(y_true, y_pred)))
        > 1e-4
    )


def test_perfect_prediction():
    y_true = np.eye(3, dtype=np.float32)[LABELS][None]
    close(L.dice_loss()(y_true, y_true), 0.0)
    close(L.dice_loss(smooth=0.0)(y_true, y_true), 0.0)
    close(L.jaccard_loss()(y_true, y_true), 0.0)
    close(L.weighted_dice_loss(W)(y_true, y_true), 0.0)
    close(L.tversky_loss(0.3, 0.7)(y_true, y_true), 0.0)
    close(L.crossentropy_loss()(y_true, y_true), [0.0])
    close(L.focal_loss()(y_true, y_true), [0.0])
    # no tumour anywhere, predicted perfectly: smoothed loss still 0 (absent class scores 1)
    no_tumor = np.eye(3, dtype=np.float32)[np.array([[0, 1], [1, 0]])][None]
    close(L.dice_loss()(no_tumor, no_tumor), 0.0)


# ------------------------------------------------------------------ shapes, dtypes, gradients


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_3d_matches_2d_reshape(name):
    # (B, D, H, W, C) and the same voxels as (B, D*H, W, C) give the same loss
    y_true, y_pred = random_pair((2, 3, 4, 5, 3), seed=6)
    loss = L.get_loss(name, class_weights=W)
    v3 = val(loss(y_true, y_pred))
    v2 = val(loss(y_true.reshape(2, 12, 5, 3), y_pred.reshape(2, 12, 5, 3)))
    assert v3.shape in ((), (2,))
    assert np.all(np.isfinite(v3)) and np.all(v3 > 0)
    np.testing.assert_allclose(v3, v2, rtol=1e-5)


def test_3d_dice_against_numpy_reference():
    y_true, y_pred = random_pair((2, 3, 4, 5, 3), seed=7)
    tp = (y_true * y_pred).sum(axis=(0, 1, 2, 3))
    fp = ((1 - y_true) * y_pred).sum(axis=(0, 1, 2, 3))
    fn = (y_true * (1 - y_pred)).sum(axis=(0, 1, 2, 3))
    dc = (2 * tp + 2) / (2 * tp + fp + fn + 2)  # smooth 1 in the 2TP form
    close(L.weighted_dice_loss(W)(y_true, y_pred), 1 - (np.array(W) * dc).sum() / sum(W))


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_mixed_precision_inputs(name):
    y_true, y_pred = random_pair((2, 4, 4, 3), seed=8)
    loss = L.get_loss(name, class_weights=W)
    out16 = loss(tf.constant(y_true, tf.float16), tf.constant(y_pred, tf.float16))
    assert out16.dtype == tf.float32
    np.testing.assert_allclose(val(out16), val(loss(y_true, y_pred)), rtol=2e-3, atol=2e-3)


def _grad(loss, y_true, logits):
    var = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(loss(y_true, tf.nn.softmax(var)))
    return value, tape.gradient(value, var)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_gradients_finite(name):
    loss = L.get_loss(name, class_weights=W)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    y_true = np.eye(3, dtype=np.float32)[labels]
    cases = {
        "normal": rng.normal(size=(2, 4, 4, 3)).astype(np.float32),
        # saturated softmax: probabilities underflow to exactly 0 and 1
        "saturated": (np.where(rng.random((2, 4, 4, 3)) > 0.5, 60.0, -60.0)).astype(np.float32),
    }
    for case, logits in cases.items():
        value, grad = _grad(loss, y_true, logits)
        assert np.isfinite(val(value)), case
        assert np.all(np.isfinite(val(grad))), case
    value, grad = _grad(loss, y_true, cases["normal"])
    assert np.abs(val(grad)).max() > 0
    # batch without tumour
    no_tumor = np.eye(3, dtype=np.float32)[np.minimum(labels, 1)]
    value, grad = _grad(loss, no_tumor, cases["normal"])
    assert np.isfinite(val(value)) and np.all(np.isfinite(val(grad)))


# ------------------------------------------------------------------ registry and validation


def test_registry_names():
    assert set(L.LOSSES) == {
        "ce",
        "weighted_ce",
        "balanced_bce",
        "dice",
        "weighted_dice",
        "dice_ce",
        "jaccard",
        "softmax_dice",
        "tversky",
        "focal",
    }
    for name in L.LOSSES:
        loss = L.get_loss(name)
        assert callable(loss) and loss.__name__ == f"{name}_loss"
    assert L.get_loss().__name__ == "weighted_dice_loss"


def test_get_loss_unknown_name():
    with pytest.raises(ValueError) as err:
        L.get_loss("dcie")
    for name in L.LOSSES:
        assert name in str(err.value)
    with pytest.raises(TypeError):
        L.get_loss("dice", gamma=2.0)


def test_get_loss_passes_class_weights_and_params():
    close(L.get_loss("weighted_dice", W, smooth=0.0)(Y_TRUE, Y_PRED), 1 - 0.6028571)
    close(L.get_loss("WEIGHTED_CE", W)(Y_TRUE, Y_PRED), [1.1858461])
    close(L.get_loss("focal", W)(Y_TRUE, Y_PRED), [0.3687605])  # class weights as alpha
    close(L.get_loss("tversky", W, alpha=0.3, beta=0.7, smooth=0.0)(Y_TRUE, Y_PRED), 0.3989032)
    close(L.get_loss("dice", W, smooth=0.0)(Y_TRUE, Y_PRED), 0.4038095)  # unweighted by definition


def test_invalid_weights():
    with pytest.raises(ValueError):
        L.weighted_dice_loss([1.0, -1.0, 1.0])
    with pytest.raises(ValueError):
        L.weighted_dice_loss([1.0, 2.0])(Y_TRUE, Y_PRED)  # 2 weights, 3 classes
    with pytest.raises(ValueError):
        L.balanced_bce_loss(1.5)
    with pytest.raises(ValueError):
        L.weighted_dice_loss([1.0, math.nan, 1.0])


# ------------------------------------------------------------------ Keras integration


# tf_keras's fit() itself calls random.randint with a float bound (not this suite's code)
@pytest.mark.filterwarnings("ignore:non-integer arguments to randrange:DeprecationWarning")
def test_keras_compile_fit_evaluate():
    import tf_keras as keras

    assert keras.__version__.startswith("2.")
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 1))
    out = keras.layers.Conv2D(3, 1, activation="softmax")(inp)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss=L.get_loss("weighted_dice", W))
    rng = np.random.default_rng(10)
    x = rng.random((4, 4, 4, 1)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(4, 4, 4))]
    hist = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    # evaluate on one batch: Keras's loss equals the direct computation
    results = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    pred = model.predict(x, verbose=0)
    assert results["loss"] == pytest.approx(val(L.weighted_dice_loss(W)(y, pred)), abs=1e-5)
