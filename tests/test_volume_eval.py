"""Whole-volume scores (train.volume_eval): KiTS19 Dice per case, headline figures."""

from __future__ import annotations

import numpy as np
import pytest

from train.volume_eval import (
    case_row,
    empty_slice_false_positives,
    headline,
    kits_case_metrics,
)

# --------------------------------------------------------------------------------------------
# KiTS19 metrics on hand-made cases
# --------------------------------------------------------------------------------------------


def _case():
    truth = np.zeros((2, 4, 5), np.uint8)
    truth[0, :2, :] = 1  # 10 kidney voxels
    truth[0, 0, :2] = 2  # 2 of them tumor
    return truth


def test_perfect_prediction_scores_one():
    truth = _case()
    assert kits_case_metrics(truth, truth) == {"kidney_dice": 1.0, "tumor_dice": 1.0}


def test_empty_prediction_scores_zero():
    truth = _case()
    empty = np.zeros_like(truth)
    assert kits_case_metrics(truth, empty) == {"kidney_dice": 0.0, "tumor_dice": 0.0}


def test_tumor_dice_convention_when_empty():
    truth = _case()
    truth[truth == 2] = 1  # no tumor in the truth
    assert kits_case_metrics(truth, truth)["tumor_dice"] == 1.0  # both empty
    pred = truth.copy()
    pred[1, 3, 4] = 2  # one false tumor voxel
    assert kits_case_metrics(truth, pred)["tumor_dice"] == 0.0  # only one empty


def test_known_overlap_matches_hand_computation():
    truth = _case()
    pred = np.zeros_like(truth)
    pred[0, 1:3, :] = 1  # 10 voxels predicted, 5 of them in the truth's kidney+tumor
    pred[0, 0, 0] = 2  # one tumor voxel right (TP 1), truth tumor has 2 (FN 1)
    pred[1, 0, 0] = 2  # and one wrong (FP 1)
    # kidney+tumor: truth 10 voxels, prediction 12, overlap 6 -> 2*6 / (10 + 12)
    # tumor: truth 2, prediction 2, overlap 1 -> 2*1 / (2 + 2)
    scores = kits_case_metrics(truth, pred)
    assert scores["kidney_dice"] == pytest.approx(12 / 22)
    assert scores["tumor_dice"] == pytest.approx(0.5)


def test_empty_slices_with_more_than_50_predicted_pixels_are_false_alarms():
    truth = np.zeros((4, 20, 20), np.uint8)
    truth[0, 2:5, 2:5] = 1  # slice 0 holds kidney: not an empty slice
    pred = np.zeros_like(truth)
    pred[0, :10, :10] = 1
    pred[1, :5, :10] = 1  # 50 pixels: not more than 50
    pred[2, :6, :10] = 2  # 60 pixels of tumor on an empty slice
    assert empty_slice_false_positives(truth, pred) == (3, 1)
    assert empty_slice_false_positives(truth, pred, threshold=10) == (3, 2)


def test_headline_averages_over_cases_that_hold_the_class():
    truth = np.zeros((1, 10, 10), np.uint8)
    with_kidney = truth.copy()
    with_kidney[0, :4, :4] = 1
    with_tumor = with_kidney.copy()
    with_tumor[0, :2, :2] = 2
    empty_pred = np.zeros_like(truth)
    rows = [
        case_row("a", (1, 1, 1), with_tumor, with_tumor),  # perfect
        case_row("b", (1, 1, 1), with_kidney, empty_pred),  # missed kidney
        case_row("c", (1, 1, 1), truth, np.ones_like(truth)),  # 100 false pixels
        case_row("d", (1, 1, 1), truth, empty_pred),  # clean
    ]
    head = headline(rows)
    assert head["kidney_tumor_dice"] == pytest.approx(0.5)  # a and b
    assert head["tumor_dice"] == pytest.approx(1.0)  # a only
    assert head["empty_fp_rate"] == pytest.approx(0.5)  # c of c and d
    assert (head["n_kidney"], head["n_tumor"], head["n_empty"]) == (2, 1, 2)
    assert headline([])["kidney_tumor_dice"] is None
