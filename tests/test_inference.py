"""The inference core (train.inference): preprocessing, sliding windows, resampling, checks."""

from __future__ import annotations

import numpy as np
import pytest
from inference_runs import SIZE, make_run, run_config, synthetic_ct

from preprocess.kits import kits_affine
from preprocess.resize import resize_images, window_to_uint8
from train.inference import (
    InferenceError,
    blend_windows,
    check_affine,
    gaussian_weights,
    keep_largest_components,
    labels_to_original,
    load_model,
    predict_volume,
    preprocess_volume,
    window_starts,
)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run2d"))


@pytest.fixture(scope="module")
def run3d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run3d"), "unet3d", (8, SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def model2d(run2d):
    return load_model(run2d)


@pytest.fixture(scope="module")
def model3d(run3d):
    return load_model(run3d)


def test_preprocess_volume_is_the_training_preprocessing():
    # 40x48 -> 32x32 is a non-integer shrink: OpenCV's INTER_AREA then takes at most 4
    # channels per call (preprocess.resize chunks for it; 12 slices here)
    hu, _ = synthetic_ct()
    config = run_config("unet2d", (SIZE, SIZE, 3), {})
    x = preprocess_volume(hu, config)
    expected = resize_images(window_to_uint8(hu, -512, 512), SIZE).astype(np.float32) / 255
    assert x.shape == (hu.shape[0], SIZE, SIZE, 3) and x.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(x[..., c], expected)


def test_gaussian_weights_symmetric_peaked_and_sigma():
    for depth in (8, 32, 33):
        w = gaussian_weights(depth)
        np.testing.assert_allclose(w, w[::-1], rtol=0, atol=1e-7)
        assert w.max() == pytest.approx(1.0) and np.all(w > 0)
        centre = (depth - 1) / 2
        sigma = 0.125 * depth
        z = np.arange(depth)
        expected = np.exp(-((z - centre) ** 2) / (2 * sigma**2))
        np.testing.assert_allclose(w, expected / expected.max(), rtol=1e-6)
    assert np.argmax(gaussian_weights(33)) == 16


def test_window_starts_cover_the_volume_with_overlap():
    assert window_starts(32, 32) == [0]
    assert window_starts(5, 32) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[:3] == [0, 16, 32] and starts[-1] == 100 - 32
    covered = np.zeros(100, int)
    for s in starts:
        covered[s : s + 32] += 1
    assert covered.min() >= 1 and covered.max() <= 3
    assert window_starts(40, 8, 0.0) == [0, 8, 16, 24, 32]


def test_blend_windows_is_the_weighted_average_and_sums_to_one():
    depth, n = 4, 6
    w = gaussian_weights(depth)
    starts = [0, 2]
    a = np.zeros((depth, 1, 1, 3), np.float32)
    a[..., 1] = 1.0  # window 0 says kidney everywhere
    b = np.zeros((depth, 1, 1, 3), np.float32)
    b[..., 2] = 1.0  # window 1 says tumor everywhere
    out = blend_windows([a, b], starts, n, w)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-6)
    # slice 2 is a's 3rd slice and b's 1st: kidney share w[2] / (w[2] + w[0])
    np.testing.assert_allclose(out[2, 0, 0, 1], w[2] / (w[2] + w[0]), rtol=1e-6)
    np.testing.assert_allclose(out[3, 0, 0, 2], w[1] / (w[3] + w[1]), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], [0, 1, 0])  # only window a
    np.testing.assert_allclose(out[5, 0, 0], [0, 0, 1])  # only window b
    # equal windows blend to themselves, whatever the weights
    same = blend_windows([a, a], starts, n, w)
    np.testing.assert_allclose(same, np.broadcast_to(a[:1], same.shape), rtol=1e-6)


def test_sliding_window_equals_single_window_when_volume_is_one_block(model3d):
    hu, _ = synthetic_ct(n_slices=8, height=SIZE, width=SIZE)
    probs = predict_volume(model3d.model, hu, model3d.config)
    x = preprocess_volume(hu, model3d.config)
    single = model3d.model.predict_on_batch(x[None])[0]
    assert probs.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_allclose(probs, single, rtol=1e-5, atol=1e-6)


def test_thin_volume_is_padded_and_cropped(model3d):
    hu, _ = synthetic_ct(n_slices=5, height=40, width=40)
    probs = predict_volume(model3d.model, hu, model3d.config)
    x = preprocess_volume(hu, model3d.config)
    padded = np.concatenate([x, np.zeros((3, *x.shape[1:]), np.float32)])
    expected = model3d.model.predict_on_batch(padded[None])[0, :5]
    assert probs.shape == (5, SIZE, SIZE, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_sliding_window_on_a_long_volume(model3d):
    hu, _ = synthetic_ct(n_slices=19, height=40, width=48)
    seen = []
    probs = predict_volume(
        model3d.model, hu, model3d.config, batch_size=2, progress=lambda d, t: seen.append((d, t))
    )
    assert probs.shape == (19, SIZE, SIZE, 3)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    n_windows = len(window_starts(19, 8))
    assert seen[-1] == (n_windows, n_windows)


def test_2d_prediction_does_not_depend_on_batch_size(model2d):
    hu, _ = synthetic_ct(n_slices=7)
    timings: dict[str, float] = {}
    one = predict_volume(model2d.model, hu, model2d.config, batch_size=1, timings=timings)
    many = predict_volume(model2d.model, hu, model2d.config, batch_size=5)
    assert one.shape == (7, SIZE, SIZE, 3)
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)
    assert set(timings) == {"preprocess", "network"}


def test_labels_to_original_upsamples_probabilities_then_argmax():
    probs = np.zeros((2, 4, 4, 3), np.float32)
    probs[..., 0] = 1.0
    probs[0, :2, :2] = [0, 1, 0]  # kidney in the top-left quarter of slice 0
    probs[1, 2:, 2:] = [0, 0, 1]  # tumor in the bottom-right quarter of slice 1
    labels = labels_to_original(probs, (2, 8, 12))
    assert labels.shape == (2, 8, 12) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    assert labels[0, 0, 0] == 1 and labels[0, 7, 11] == 0 and labels[1, 7, 11] == 2
    assert (labels[0] == 1).sum() == pytest.approx(8 * 12 / 4, rel=0.3)
    same = labels_to_original(probs, (2, 4, 4))
    np.testing.assert_array_equal(same, probs.argmax(-1))
    with pytest.raises(ValueError):
        labels_to_original(probs, (3, 8, 8))


def test_keep_largest_components_removes_small_islands():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[4:6, 4:6, 4:6] = 2  # tumor inside the first kidney
    labels[2:8, 12:18, 12:18] = 1
    labels[9, 19, 0] = 1  # a one-voxel island
    labels[0, 10, 10] = 2  # a tumor island
    out = keep_largest_components(labels, n=2)
    expected = labels.copy()
    expected[9, 19, 0] = 0
    expected[0, 10, 10] = 0
    np.testing.assert_array_equal(out, expected)
    only_one = keep_largest_components(labels, n=1)
    assert (only_one[2:8, 12:18, 12:18] == 0).all() and (only_one[4:6, 4:6, 4:6] == 2).all()
    # a diagonal neighbour between slices belongs to the component (26-connectivity)
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = 1
    np.testing.assert_array_equal(keep_largest_components(diag, n=1), diag)
    assert not keep_largest_components(np.zeros((2, 2, 2), np.uint8)).any()


def test_check_affine_accepts_kits_layout_and_flips_rejects_oblique_and_non_axial():
    check_affine(kits_affine((2.5, 0.78, 0.78)), "ok.nii.gz")
    flipped = np.diag([0.8, 0.8, 3.0, 1.0])[[2, 1, 0, 3]]  # axis 0 -> +z, other signs flipped
    flipped[:3, :3] = np.abs(flipped[:3, :3])
    check_affine(flipped, "flipped.nii.gz")
    angle = np.deg2rad(15)
    rot = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    oblique = kits_affine((2.5, 0.8, 0.8))
    oblique[:3, :3] = rot @ oblique[:3, :3]
    with pytest.raises(InferenceError, match="oblique.nii.gz: oblique"):
        check_affine(oblique, "oblique.nii.gz")
    sagittal = np.diag([2.5, 0.8, 0.8, 1.0])  # array axis 0 along world x
    with pytest.raises(InferenceError, match="sag.nii.gz: array axis 0 runs along world x"):
        check_affine(sagittal, "sag.nii.gz")
    with pytest.raises(InferenceError, match="zero voxel spacing"):
        check_affine(np.diag([0.0, 1, 1, 1]), "z.nii.gz")


def test_mismatched_weights_name_the_file_and_the_model(run2d, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run2d, other)
    config = json.loads((other / "config.json").read_text())
    config["model_options"] = {"base_filters": 4}  # not what the weights were trained with
    (other / "config.json").write_text(json.dumps(config))
    weights = other / "checkpoints" / "best.weights.h5"
    with pytest.raises(InferenceError, match=rf"{weights}: weights do not match model 'unet2d'"):
        load_model(other)


def test_bare_weights_use_config_in_parent_or_thesis_defaults(run2d, tmp_path):
    weights = run2d / "checkpoints" / "best.weights.h5"
    loaded = load_model(weights=weights, model_name="unet2d")
    assert loaded.config_path == run2d / "config.json"
    with pytest.raises(InferenceError, match="configured for model 'unet2d', not 'unet3d'"):
        load_model(weights=weights, model_name="unet3d")
    alone = tmp_path / "alone.weights.h5"
    alone.write_bytes(weights.read_bytes())
    # no config.json: the thesis's unet2d (64 base filters, 128x128x3) does not fit these weights
    with pytest.raises(InferenceError, match=rf"{alone}: weights do not match model 'unet2d'"):
        load_model(weights=alone, model_name="unet2d")
    with pytest.raises(InferenceError, match="name the model with --model"):
        load_model(weights=alone)
    alone.write_bytes(b"garbage")
    with pytest.raises(InferenceError, match=rf"{alone}: not a readable Keras HDF5 weights"):
        load_model(weights=alone, model_name="unet2d")


def test_run_falls_back_to_latest_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", checkpoint="latest.weights.h5")
    assert load_model(run).weights_path.name == "latest.weights.h5"
    with pytest.raises(InferenceError, match="no best.weights.h5 or latest.weights.h5"):
        load_model(make_run(tmp_path / "empty", checkpoint="other.h5"))
