"""Tests of models/: registry, exact parameter counts, shapes, training, weights, input checks.

Kept small for a 2-core CPU: each model is built once at its default shape for the exact count
and a single-image forward pass (Unet3D's forward pass uses an 8x32x32 block), training and
round-trip tests use small inputs and reduced widths for the large models (Unet2D keeps its full
default architecture), and the few training steps run eagerly, which on a CPU is faster than
tracing a graph that is run only six times.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported (conftest too)

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import models
from models import summary

README_TABLE = Path(models.__file__).resolve().parent / "README_table.md"

# model.count_params() at the default (thesis) input shape, 3 classes, default options.
EXPECTED_PARAMS = {
    "unet2d": 2_465_619,  # = thesis
    "unet3d": 15_296_451,  # = thesis
    "pspnet_s": 1_651_331,  # = thesis
    "pspnet_b": 46_765_763,  # = thesis
    "denseunet_s": 1_641_859,  # thesis misprints PSPNet_s's count
    "denseunet_b": 43_023_299,  # thesis misprints PSPNet_b's count
    "deeplabv3plus": 2_753_971,  # full DeepLabv3+; thesis's variant below is 2,142,019
}
EXPECTED_STRIDES = {
    "unet2d": 4,
    "unet3d": 8,
    "pspnet_s": 16,
    "pspnet_b": 128,
    "denseunet_s": 16,
    "denseunet_b": 32,
    "deeplabv3plus": 16,
}
FORWARD_SHAPE_3D = (8, 32, 32, 3)  # small input for the full-size Unet3D
# Input shape and options for the training / weights round-trip tests.
TRAIN_CASES: dict[str, tuple[tuple[int, ...], dict]] = {
    "unet2d": ((32, 32, 3), {}),  # the default architecture, full width
    "unet3d": ((8, 16, 16, 3), {"base_filters": 8}),
    "pspnet_s": ((32, 32, 3), {"width": 0.25}),
    "pspnet_b": ((128, 128, 3), {"width": 0.125}),
    "denseunet_s": ((32, 32, 3), {}),
    "denseunet_b": ((32, 32, 3), {"width": 0.25}),
    "deeplabv3plus": ((32, 32, 3), {"width": 0.5}),
}
N_STEPS = 5

# tf_keras seeds its layers with random.randint(1, 1e9) once keras.utils.set_random_seed is used;
# Python 3.11 warns about the float bound on every layer. Not ours to fix; keep the output quiet.
pytestmark = pytest.mark.filterwarnings(
    "ignore:non-integer arguments to randrange:DeprecationWarning"
)


def _batch(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed tiny batch whose labels are a function of the image (so there is something to
    learn): background, kidney where channel 0 > 0.5, tumor where it is > 0.8."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    labels = (x[..., 0] > 0.5).astype(int) + (x[..., 0] > 0.8).astype(int)
    return x, np.eye(3, dtype=np.float32)[labels]


def _free() -> None:
    keras.backend.clear_session()


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert models.MODEL_NAMES == (
        "unet2d",
        "unet3d",
        "pspnet_s",
        "pspnet_b",
        "denseunet_s",
        "denseunet_b",
        "deeplabv3plus",
    )
    for name in models.MODEL_NAMES:
        assert models.is_3d(name) == (name == "unet3d")
        expected_shape = (32, 128, 128, 3) if name == "unet3d" else (128, 128, 3)
        assert models.default_input_shape(name) == expected_shape
        assert models.required_stride(name) == EXPECTED_STRIDES[name]
    # Option-dependent strides.
    assert models.required_stride("pspnet_s", ppm_source="features") == 64
    assert models.required_stride("deeplabv3plus", output_stride=8) == 8
    with pytest.raises(ValueError, match="unknown model 'unet4d'"):
        models.build("unet4d")


# ------------------------------------------------------------------------------------------
# Parameter counts and forward pass
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_param_count_and_forward(name: str) -> None:
    """Exact count at the default (thesis) input shape; then a forward pass: output has the input's
    spatial shape and 3 channels, and is a softmax. One build per model serves both checks (the
    2D models run at 128x128, which is cheap; Unet3D's forward pass uses a small 3D model of the
    same architecture, since its count is checked on the default one)."""
    model = models.build(name)
    assert model.input_shape[1:] == models.default_input_shape(name)
    assert model.count_params() == EXPECTED_PARAMS[name]
    if models.is_3d(name):
        _free()
        model = models.build(name, FORWARD_SHAPE_3D)
        # Fully convolutional: the count does not depend on the input size.
        assert model.count_params() == EXPECTED_PARAMS[name]
    shape = model.input_shape[1:]
    assert model.output_shape == (None, *shape[:-1], 3)
    x, _ = _batch(shape, n=1)
    y = model(x, training=False).numpy()
    assert y.shape == (1, *shape[:-1], 3)
    assert np.all(np.isfinite(y)) and np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    _free()


@pytest.fixture
def mixed_float16():
    """The mixed_float16 global policy for one test, restored afterwards."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)
        _free()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_softmax_is_float32_under_mixed_precision(name: str, mixed_float16: None) -> None:
    """Under mixed_float16 the body computes in float16, the softmax layer itself in float32:
    probabilities from extreme and from ordinary logits are finite float32 summing to 1 (a float16
    softmax rounds each probability to 11 significant bits, so its sums miss 1 by up to ~1e-3)."""
    shape, options = TRAIN_CASES[name]
    model = models.build(name, shape, **options)
    softmax = model.get_layer("softmax")
    assert model.layers[-1] is softmax and softmax.compute_dtype == "float32"
    assert model.get_layer("classifier").compute_dtype == "float16"
    assert model.output.dtype == "float32"
    classifier = model.get_layer("classifier")
    kernel, bias = classifier.get_weights()
    x, _ = _batch(shape, n=1)
    # TensorFlow's CPU kernels lack float16 3D pooling; XLA has it (as GPUs do).
    forward = tf.function(model, jit_compile=True) if models.is_3d(name) else model
    # training=True: BatchNorm uses the batch's statistics. With the initial moving statistics
    # (mean 0, variance 1) the untrained deep bodies (PSPNet_b) overflow float16 before the head.
    # Extreme logits: near the float16 limit (65504), far apart.
    classifier.set_weights([np.zeros_like(kernel), np.array([6e4, -6e4, 3e4], np.float32)])
    extreme = forward(x, training=True)
    # Ordinary logits whose probabilities are not all 0 or 1.
    rng = np.random.default_rng(0)
    classifier.set_weights([kernel, rng.uniform(-2, 2, bias.shape).astype(np.float32)])
    ordinary = forward(x, training=True)
    for y in (extreme, ordinary):
        assert y.dtype == "float32"
        y = y.numpy()
        assert np.all(np.isfinite(y)) and np.all(y >= 0)
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(extreme.numpy().argmax(-1), 0)


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        # The thesis's published DeepLab: MobileNetV2 at output stride 8, two-branch ASPP, no
        # decoder: exactly its 2,142,019.
        ("deeplabv3plus", {"output_stride": 8, "atrous_rates": (), "decoder": False}, 2_142_019),
        # Textbook PSPNet_s pooling the encoder output instead of the image.
        ("pspnet_s", {"ppm_source": "features"}, 1_910_403),
        # Reduced-width Unet2D for demos, same code path.
        ("unet2d", {"base_filters": 16}, 157_203),
        ("unet2d", {"width": 0.25}, 157_203),
    ],
)
def test_param_count_variants(name: str, options: dict, expected: int) -> None:
    assert models.build(name, **options).count_params() == expected
    _free()


def test_readme_table_matches_asserted_counts() -> None:
    text = README_TABLE.read_text()
    counts = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in models.MODEL_NAMES:
            counts[cells[0]] = int(cells[1].replace(",", ""))
    assert counts == EXPECTED_PARAMS
    # The table is the summary tool's output: check one row verbatim.
    row = summary.format_markdown(summary.table_rows(["unet2d"])).splitlines()[-1]
    assert row in text
    _free()


def test_summary_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main(["unet2d"]) == 0
    out = capsys.readouterr().out
    assert "2,465,619" in out and "0.8633" in out and "128x128x3" in out
    with pytest.raises(SystemExit):
        summary.main(["--help"])
    assert "count_params" in capsys.readouterr().out
    _free()


# ------------------------------------------------------------------------------------------
# Training and weights
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=models.MODEL_NAMES)
def trained(request: pytest.FixtureRequest) -> tuple[str, keras.Model, np.ndarray, list[float]]:
    """Each model after N_STEPS Adam steps on a fixed tiny batch (categorical crossentropy).

    Returns (name, model, batch, losses): ``losses[0]`` is the loss before the first update,
    ``losses[-1]`` the loss after N_STEPS updates.
    """
    name = request.param
    shape, options = TRAIN_CASES[name]
    keras.utils.set_random_seed(0)
    model = models.build(name, shape, **options)
    # Eager: tracing the training graph costs more than six steps of a tiny batch on a CPU.
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", run_eagerly=True)
    x, y = _batch(shape)
    losses = [float(model.train_on_batch(x, y)) for _ in range(N_STEPS + 1)]
    yield name, model, x, losses
    del model
    _free()


@pytest.mark.timeout(300)
def test_training_lowers_loss(trained: tuple) -> None:
    name, _, _, losses = trained
    assert all(np.isfinite(losses)), f"{name}: {losses}"
    assert losses[-1] < losses[0], f"{name}: loss did not decrease: {losses}"


@pytest.mark.timeout(300)
def test_weights_roundtrip(trained: tuple, tmp_path: Path) -> None:
    """save_weights / load_weights (HDF5) into a freshly built model reproduces the predictions,
    BatchNorm statistics changed by training included.

    The fresh model is built with unknown (None) spatial sides, which also checks that weights do
    not depend on the input size and that such a model runs on any size divisible by the stride
    (here a non-square one); one build serves both checks, to keep the file fast.
    """
    name, model, x, _ = trained
    shape, options = TRAIN_CASES[name]
    path = tmp_path / f"{name}.weights.h5"
    model.save_weights(str(path))
    expected = model(x, training=False).numpy()

    keras.utils.set_random_seed(1)  # a different initialisation than the trained model's
    fresh = models.build(name, (None,) * (len(shape) - 1) + (3,), **options)
    assert not np.allclose(fresh(x, training=False).numpy(), expected)
    fresh.load_weights(str(path))
    np.testing.assert_allclose(fresh(x, training=False).numpy(), expected, rtol=0, atol=1e-6)
    # Deterministic layer names: checkpoints can also be loaded by name (by_name=True).
    assert [layer.name for layer in fresh.layers] == [layer.name for layer in model.layers]

    sides = list(shape[:-1])
    sides[-1] += models.required_stride(name)  # non-square, still divisible by the stride
    x_other, _ = _batch((*sides, 3), n=1)
    y = fresh(x_other, training=False).numpy()
    assert y.shape == (1, *sides, 3)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)


def test_l2_option() -> None:
    plain = models.build("unet2d", (32, 32, 3), base_filters=4)
    assert plain.losses == []
    regularised = models.build("unet2d", (32, 32, 3), base_filters=4, l2=1e-4)
    n_convs = sum(isinstance(layer, keras.layers.Conv2D) for layer in regularised.layers)
    assert len(regularised.losses) == n_convs  # one penalty per convolution kernel
    assert regularised.count_params() == plain.count_params()
    _free()


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [
        ("unet2d", (130, 128, 3), {}),
        ("unet2d", (128, 128), {}),
        ("unet2d", (32, 128, 128, 3), {}),
        ("unet3d", (128, 128, 3), {}),  # a 2D shape for the 3D model
        ("unet3d", (36, 128, 128, 3), {}),  # depth not a multiple of 8
        ("pspnet_s", (136, 136, 3), {}),
        ("pspnet_s", (32, 32, 3), {"ppm_source": "features"}),
        ("pspnet_b", (64, 64, 3), {}),
        ("denseunet_s", (120, 120, 3), {}),
        ("denseunet_b", (128, 48, 3), {}),
        ("deeplabv3plus", (120, 128, 3), {}),
        ("deeplabv3plus", (36, 36, 3), {"output_stride": 8}),
    ],
)
def test_wrong_input_shape(name: str, shape: tuple, options: dict) -> None:
    stride = models.required_stride(name, **options)
    pattern = rf"^{name} needs .*divisible by {stride}\b.*got {re.escape(str(shape))}$"
    with pytest.raises(ValueError, match=pattern):
        models.build(name, shape, **options)


def test_exact_error_message() -> None:
    with pytest.raises(ValueError) as info:
        models.build("unet2d", (130, 128, 3))
    assert str(info.value) == "unet2d needs spatial sides divisible by 4; got (130, 128, 3)"
