"""Unet2D: the thesis's best 2D model ("Unet2D_small" in its code), 2,465,619 parameters.

Two pooling levels (64, 128 filters), a 256-filter bottom of three convolutions, and a decoder
that upsamples, applies a 2x2 convolution, concatenates the skip link and runs two 3x3
convolutions; a final 3x3 convolution to 10 channels and a 1x1 softmax classifier. Every
convolution is conv+ReLU followed by BatchNormalization (the thesis's order). Required stride: 4.
"""

import tf_keras as keras

from models.layers import (
    conv_relu_bn,
    scaled,
    segmentation_head,
    unet_decoder_block,
    unet_encoder_block,
)


def build_unet2d(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    base_filters: int | None = None,
) -> keras.Model:
    """Build Unet2D. ``base_filters`` (default ``64 * width``) sets the first level's filters;
    level i has ``base_filters * 2**i``."""
    f = base_filters if base_filters is not None else scaled(64, width)
    inputs = keras.Input(shape=input_shape, name="image")
    skip1, x = unet_encoder_block(inputs, f, name="enc1", l2=l2)
    skip2, x = unet_encoder_block(x, 2 * f, name="enc2", l2=l2)
    for i in range(3):
        x = conv_relu_bn(x, 4 * f, 3, name=f"bottom_c{i + 1}", l2=l2)
    x = unet_decoder_block(x, skip2, 2 * f, name="dec2", l2=l2)
    x = unet_decoder_block(x, skip1, f, name="dec1", l2=l2)
    # The thesis's narrow 10-channel layer before the classifier; not scaled by width.
    x = conv_relu_bn(x, 10, 3, name="head", l2=l2)
    return keras.Model(inputs, segmentation_head(x, n_classes, l2=l2), name="unet2d")
