"""The inference core (train.inference): model loading and segmenting a canonical volume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from inference_runs import SIZE, make_run, run_config, synthetic_ct

from preprocess.resize import resize_images, window_to_uint8
from train.inference import (
    InferenceError,
    checked_preprocessing,
    load_model,
    preprocessing_params,
    segment_volume,
)
from train.model_grid import grid_geometry, labels_from_grid
from train.sliding_window import window_starts


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run2d"))


@pytest.fixture(scope="module")
def model2d(run2d):
    return load_model(run2d)


class RecordingModel:
    """A deterministic stand-in for a Keras model: records its inputs; 'kidney' where bright."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        self.inputs.append(np.array(batch))
        kidney = (batch[..., 0] > 0.6).astype(np.float32)
        return np.stack([1 - kidney, kidney, np.zeros_like(kidney)], axis=-1)


def _expected_input(hu):
    return resize_images(window_to_uint8(hu, -512, 512), SIZE).astype(np.float32) / 255


def test_2d_segmentation_is_training_preprocessing_then_labels_back(model2d):
    hu, _ = synthetic_ct(n_slices=7)
    stand_in = RecordingModel()
    labels = segment_volume(stand_in, hu, (0.8, 0.8), model2d.config, batch_size=3)
    x = np.concatenate(stand_in.inputs)
    assert x.shape == (7, SIZE, SIZE, 3) and [len(b) for b in stand_in.inputs] == [3, 3, 1]
    for c in range(3):
        np.testing.assert_array_equal(x[..., c], _expected_input(hu))
    probs = stand_in.predict_on_batch(x)
    geom = grid_geometry(hu.shape[1:], None, None, SIZE)
    np.testing.assert_array_equal(labels, labels_from_grid(probs, geom))
    assert labels.shape == hu.shape and labels.dtype == np.uint8


def test_2d_prediction_does_not_depend_on_batch_size(model2d):
    hu, _ = synthetic_ct(n_slices=7)
    timings: dict[str, float] = {}
    config = model2d.config
    one = segment_volume(model2d.model, hu, None, config, batch_size=1, timings=timings)
    many = segment_volume(model2d.model, hu, None, config, batch_size=5)
    np.testing.assert_array_equal(one, many)
    assert set(timings) == {"preprocess", "network", "resample"}


def test_3d_sliding_window_and_a_thin_volume_padded_with_a_message(tmp_path, caplog):
    loaded = load_model(make_run(tmp_path / "run3d", "unet3d", (8, SIZE, SIZE, 3)))
    hu, _ = synthetic_ct(n_slices=19, height=40, width=48)
    seen = []
    labels = segment_volume(
        loaded.model, hu, None, loaded.config, 2, progress=lambda d, t: seen.append((d, t))
    )
    assert labels.shape == hu.shape
    n_windows = len(window_starts(19, 8))
    assert seen[-1] == (n_windows, n_windows)
    # one block: the same as the network on that block
    x = _expected_input(hu[:8])
    single = loaded.model.predict_on_batch(np.repeat(x[None, ..., None], 3, axis=-1))[0]
    geom = grid_geometry(hu.shape[1:], None, None, SIZE)
    one_block = segment_volume(loaded.model, hu[:8], None, loaded.config)
    np.testing.assert_array_equal(one_block, labels_from_grid(np.asarray(single), geom))
    with caplog.at_level(logging.INFO, logger="train"):
        thin = segment_volume(loaded.model, hu[:1], None, loaded.config, name="thin.nii.gz")
    assert thin.shape == (1, 40, 48)
    assert "thin.nii.gz: 1 slice(s), fewer than the 3D model's window of 8: padded" in caplog.text


def test_target_spacing_is_replayed_from_the_run_config():
    config = run_config("unet2d", (SIZE, SIZE, 3), {}, target_spacing=1.0)
    assert preprocessing_params(config).target_spacing == 1.0
    # a 20 mm bright square on 0.5 mm pixels: 20 pixels wide on the model's grid at 1 mm
    hu = np.full((2, 60, 60), -1000.0, np.float32)
    hu[:, 20:60, 10:50] = 300.0
    stand_in = RecordingModel()
    labels = segment_volume(stand_in, hu, (0.5, 0.5), config)
    seen = stand_in.inputs[0][0, ..., 0] > 0.5
    assert seen.sum(axis=0).max() == 20 and seen.sum(axis=1).max() == 20
    assert labels.shape == hu.shape and labels[0, 40, 30] == 1 and labels[0, 5, 5] == 0
    with pytest.raises(ValueError, match="spacing needed"):
        segment_volume(stand_in, hu, None, config)
    bad = run_config("unet2d", (SIZE, SIZE, 3), {}, target_spacing=-1.0)
    with pytest.raises(InferenceError, match="target_spacing -1.0"):
        checked_preprocessing(bad, None)


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
