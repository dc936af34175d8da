"""The seven segmentation networks of the thesis, behind one registry.

``models.build(name, input_shape=None, n_classes=3, **options)`` returns a tf_keras (Keras 2)
functional model whose output is a channel-last softmax over (background, kidney, tumor) with the
same spatial shape as the input. Shared options: ``l2`` (L2 factor on convolution kernels,
default 0.0; the thesis trained with 1e-4) and ``width`` (channel multiplier, default 1.0);
Unet2D/Unet3D also take ``base_filters``. Model-specific options are documented in each model's
module (``models.pspnet``, ``models.deeplabv3plus``, ...).

This package knows nothing of data or training. Importing it is cheap: TensorFlow is imported
when the first model is built.
"""

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# Keras 2 (tf-keras) must be selected before TensorFlow is first imported anywhere; see
# ARCHITECTURE.md. setdefault keeps an explicit choice made by the caller.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids importing TensorFlow at import time
    import tf_keras


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model without building it."""

    module: str
    builder: str
    default_input_shape: tuple[int, ...]
    stride: Callable[..., int]
    is_3d: bool
    thesis_name: str
    thesis_params: int  # as printed in the thesis
    thesis_jc_w: float  # weighted Jaccard on the test set, thesis tables 5.1/5.2
    thesis_params_note: str = ""  # set when the printed count is not this model's


def _fixed(stride: int) -> Callable[..., int]:
    def stride_fn(**_options: Any) -> int:
        return stride

    return stride_fn


def _pspnet_s_stride(ppm_source: str = "image", **_: Any) -> int:
    # The 16-pixel pyramid window pools the image itself (thesis code) or the 1/4-size encoder
    # output (PSPNet paper).
    strides = {"image": 16, "features": 64}
    if ppm_source not in strides:
        raise ValueError(
            f"pspnet_s: ppm_source must be one of {tuple(strides)}; got {ppm_source!r}"
        )
    return strides[ppm_source]


def _deeplab_stride(output_stride: int = 16, **_: Any) -> int:
    # ASPP runs at 1/output_stride; the decoder's 1/4 skip divides it.
    if output_stride not in (8, 16, 32):
        raise ValueError(f"deeplabv3plus: output_stride must be 8, 16 or 32; got {output_stride!r}")
    return output_stride


_2D = (128, 128, 3)
_SPECS: dict[str, ModelSpec] = {
    "unet2d": ModelSpec(
        module="unet2d",
        builder="build_unet2d",
        default_input_shape=_2D,
        stride=_fixed(4),  # two 2x poolings
        is_3d=False,
        thesis_name="Unet2D",
        thesis_params=2_465_619,
        thesis_jc_w=0.8633,
    ),
    "unet3d": ModelSpec(
        module="unet3d",
        builder="build_unet3d",
        default_input_shape=(32, 128, 128, 3),
        stride=_fixed(8),  # three 2x2x2 poolings, depth included
        is_3d=True,
        thesis_name="Unet3D",
        thesis_params=15_296_451,
        thesis_jc_w=0.9113,
    ),
    "pspnet_s": ModelSpec(
        module="pspnet",
        builder="build_pspnet_small",
        default_input_shape=_2D,
        stride=_pspnet_s_stride,
        is_3d=False,
        thesis_name="PSPNet_s",
        thesis_params=1_651_331,
        thesis_jc_w=0.8566,
    ),
    "pspnet_b": ModelSpec(
        module="pspnet",
        builder="build_pspnet_big",
        default_input_shape=_2D,
        stride=_fixed(128),  # 16-pixel pyramid window on the 1/8-size ResNet-50 output
        is_3d=False,
        thesis_name="PSPNet_b",
        thesis_params=46_765_763,
        thesis_jc_w=0.8654,
    ),
    # The thesis prints PSPNet's counts for the DenseUnets (a copy error): nothing to match.
    "denseunet_s": ModelSpec(
        module="denseunet",
        builder="build_denseunet_small",
        default_input_shape=_2D,
        stride=_fixed(16),  # four transitions down
        is_3d=False,
        thesis_name="DenseUnet_s",
        thesis_params=1_651_331,
        thesis_jc_w=0.8522,
        thesis_params_note="PSPNet_s's count, misprinted",
    ),
    "denseunet_b": ModelSpec(
        module="denseunet",
        builder="build_denseunet_big",
        default_input_shape=_2D,
        stride=_fixed(32),  # stem conv, stem pool and three transitions, 2x each
        is_3d=False,
        thesis_name="DenseUnet_b",
        thesis_params=46_765_763,
        thesis_jc_w=0.8639,
        thesis_params_note="PSPNet_b's count, misprinted",
    ),
    "deeplabv3plus": ModelSpec(
        module="deeplabv3plus",
        builder="build_deeplabv3plus",
        default_input_shape=_2D,
        stride=_deeplab_stride,
        is_3d=False,
        thesis_name="DeepLabv3+",
        thesis_params=2_142_019,
        thesis_jc_w=0.8281,
    ),
}

MODEL_NAMES: tuple[str, ...] = (
    "unet2d",
    "unet3d",
    "pspnet_s",
    "pspnet_b",
    "denseunet_s",
    "denseunet_b",
    "deeplabv3plus",
)
assert set(MODEL_NAMES) == set(_SPECS)


def spec(name: str) -> ModelSpec:
    """Registry entry of ``name``; ValueError naming the known models if it is unknown."""
    try:
        return _SPECS[name]
    except KeyError:
        known = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def default_input_shape(name: str) -> tuple[int, ...]:
    """The thesis's input shape for ``name``: (128, 128, 3), or (32, 128, 128, 3) for Unet3D."""
    return spec(name).default_input_shape


def required_stride(name: str, **options: Any) -> int:
    """Every spatial side of the input (depth too, for Unet3D) must be a multiple of this.

    Some models' strides depend on options (``ppm_source`` of pspnet_s, ``output_stride`` of
    deeplabv3plus); pass the same options as to :func:`build`.
    """
    return spec(name).stride(**options)


def is_3d(name: str) -> bool:
    """True for models taking (depth, height, width, channels) volumes."""
    return spec(name).is_3d


def check_input_shape(name: str, input_shape: tuple[int | None, ...], **options: Any) -> None:
    """Raise ValueError (naming the model and its stride) unless ``input_shape`` suits ``name``.

    The shape excludes the batch axis and is channel-last; spatial sides may be None (checked
    when data arrives), the channel count must be a positive integer.
    """
    stride = required_stride(name, **options)
    rank = 4 if is_3d(name) else 3
    axes = "(depth, height, width, channels)" if rank == 4 else "(height, width, channels)"
    shape = tuple(input_shape)
    need = f"{name} needs a {rank}-D input shape {axes} with spatial sides divisible by {stride}"
    if len(shape) != rank:
        raise ValueError(f"{need}; got {shape}")
    *spatial, channels = shape
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{need} and a known channel count; got {shape}")
    for side in spatial:
        if side is None:
            continue
        if not isinstance(side, int) or side < 1 or side % stride:
            raise ValueError(f"{name} needs spatial sides divisible by {stride}; got {shape}")


def build(
    name: str,
    input_shape: tuple[int | None, ...] | None = None,
    n_classes: int = 3,
    **options: Any,
) -> "tf_keras.Model":
    """Build model ``name`` (one of :data:`MODEL_NAMES`).

    ``input_shape`` excludes the batch axis (default: :func:`default_input_shape`); ``n_classes``
    is the softmax width (3: background, kidney, tumor). ``options`` go to the model's builder
    (``l2``, ``width``, ``base_filters`` and model-specific ones); an unknown option raises
    TypeError. Raises ValueError for an unknown name or an unsuitable input shape.
    """
    entry = spec(name)
    shape = tuple(entry.default_input_shape if input_shape is None else input_shape)
    check_input_shape(name, shape, **options)
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer; got {n_classes!r}")
    builder = getattr(importlib.import_module(f"models.{entry.module}"), entry.builder)
    return builder(input_shape=shape, n_classes=n_classes, **options)


__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "build",
    "check_input_shape",
    "default_input_shape",
    "is_3d",
    "required_stride",
    "spec",
]
