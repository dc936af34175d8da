"""train.config: the command line is generated from TrainConfig's fields, one definition each."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest

from train.config import DEFAULTS_2D_3D, TrainConfig, build_parser, parse_args

REQUIRED = ["--model", "unet2d", "--data", "d", "--out", "o"]


def test_every_field_is_an_option_with_help_and_its_default() -> None:
    actions = {a.dest: a for a in build_parser()._actions}
    parsed = build_parser().parse_args(REQUIRED)
    for f in fields(TrainConfig):
        assert f.name in actions, f"TrainConfig.{f.name} has no command-line option"
        assert actions[f.name].help, f"--{f.name} has no help"
        if f.default is not MISSING:
            assert getattr(parsed, f.name) == f.default, f.name
        elif f.default_factory is not MISSING:
            assert getattr(parsed, f.name) == f.default_factory(), f.name


def test_existing_flag_names_keep_working() -> None:
    cfg = parse_args(
        [*REQUIRED, "--no-scale-lr", "--no-augment", "--no-check-sha256", "--amp", "--xla"]
        + ["--resume", "--record-samples", "--model-option", "base_filters=16"]
        + ["--loss-params", "smooth=1e-5", "--class-factors", "1,2,3", "--batch-size", "2"]
    )
    assert (cfg.scale_lr, cfg.augment, cfg.check_sha256) == (False, False, False)
    assert (cfg.amp, cfg.xla, cfg.resume, cfg.record_samples) == (True, True, True, True)
    assert cfg.model_options == {"base_filters": 16}
    assert cfg.loss_params == {"smooth": 1e-5}
    assert cfg.class_factors == (1.0, 2.0, 3.0)
    assert cfg.batch_size == 2
    # and every bool has its opposite too
    assert parse_args([*REQUIRED, "--no-scale-lr", "--scale-lr"]).scale_lr is True


@pytest.mark.parametrize("is_3d", [False, True])
def test_resolve_fills_the_2d_3d_defaults_and_keeps_given_values(is_3d: bool) -> None:
    cfg = parse_args(REQUIRED).resolve(is_3d)
    for name, pair in DEFAULTS_2D_3D.items():
        assert getattr(cfg, name) == pair[is_3d], name
    assert parse_args([*REQUIRED, "--lr", "0.5"]).resolve(is_3d).lr == 0.5


def test_help_states_the_defaults() -> None:
    text = " ".join(build_parser().format_help().split())  # undo the line wrapping
    assert "(default: 64 for 2D, 4 for 3D models)" in text
    assert "(default: 35)" in text


@pytest.mark.parametrize(
    "extra", [["--bn-momentum", "1.0"], ["--class-factors", "1,2"], ["--verbose", "3"]]
)
def test_bad_values_exit_2(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([*REQUIRED, *extra])
    assert exc.value.code == 2


def test_missing_required_option_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "unet2d", "--data", "d"])
    assert exc.value.code == 2
