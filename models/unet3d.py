"""Unet3D: the thesis's 3D model, a "dense" U-Net after MIScnn, 15,296,451 parameters.

``base_filters`` 48, depth 3 (three pooling levels), input blocks of 32 slices of 128x128x3.
Encoder level i (``48 * 2**i`` filters): BN on the input, two conv3x3x3+ReLU+BN, concatenation
of the normalised input with the last convolution, 2x2x2 max pooling of that concatenation; the
skip link is the last convolution alone. Middle (``48 * 8`` filters): as an encoder level but
without BN after its second convolution and without pooling. Decoder level: 2x2x2 transposed
convolution (stride 2), concatenation with the skip link, then the same block as the middle.
A 1x1x1 softmax classifier. Required stride: 8 on depth, height and width.
"""

import tf_keras as keras

from models.layers import l2_regularizer, residual_concat_block, scaled, segmentation_head

DEPTH = 3


def build_unet3d(
    input_shape: tuple[int | None, ...] = (32, 128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    base_filters: int | None = None,
) -> keras.Model:
    """Build Unet3D. ``base_filters`` (default ``48 * width``) is the first level's filter count."""
    f = base_filters if base_filters is not None else scaled(48, width)
    inputs = keras.Input(shape=input_shape, name="volume")
    x = inputs
    skips = []
    for i in range(DEPTH):
        x, skip = residual_concat_block(x, f * 2**i, name=f"enc{i + 1}", l2=l2)
        skips.append(skip)
        x = keras.layers.MaxPooling3D(2, name=f"enc{i + 1}_pool")(x)
    x, _ = residual_concat_block(x, f * 2**DEPTH, name="middle", l2=l2, bn_last=False)
    for i in reversed(range(DEPTH)):
        up = keras.layers.Conv3DTranspose(
            f * 2**i,
            2,
            strides=2,
            padding="same",
            kernel_regularizer=l2_regularizer(l2),
            name=f"dec{i + 1}_upconv",
        )(x)
        x = keras.layers.Concatenate(name=f"dec{i + 1}_skip_concat")([up, skips[i]])
        x, _ = residual_concat_block(x, f * 2**i, name=f"dec{i + 1}", l2=l2, bn_last=False)
    return keras.Model(inputs, segmentation_head(x, n_classes, l2=l2, dims=3), name="unet3d")
