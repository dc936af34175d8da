"""DeepLabv3+ with a MobileNetV2 backbone (thesis section 5.2.5), built from scratch.

Backbone: MobileNetV2 (width multiplier ``width``, default 1.0) without its classification top
(no final 1280-channel convolution). To reach ``output_stride`` (16 by default) the strides that
would go beyond it become 1 and the following depthwise convolutions are dilated instead.
ASPP: image pooling, a 1x1 branch and one atrous separable 3x3 branch per rate (6, 12, 18), each
256 channels, projected by a 1x1 convolution. Decoder (the "+" of DeepLabv3+): the backbone's
stride-4 features (end of the 24-channel stage) projected to 48 channels, concatenated with the
upsampled ASPP output, two separable 3x3 convolutions with 256 filters, 1x1 classifier, bilinear
upsampling to the input size, softmax. Required stride: ``output_stride``.

The thesis reports 2,142,019 parameters. That is exactly what
``output_stride=8, atrous_rates=(), decoder=False`` builds: the thesis's code (a port of the
"bonlime" Keras DeepLab) runs its MobileNetV2 path at output stride 8 with a two-branch ASPP
(image pooling + 1x1) and no decoder, whatever the text says about rates 6, 12, 18. Dilation and
stride do not change the count; the default adds the three separable ASPP branches (+261,312),
the projection's wider input (5 x 256 instead of 2 x 256 channels, +196,608) and the decoder
(+154,032): 2,753,971 in total.
"""

import tf_keras as keras

from models.layers import (
    ResizeLike,
    Tensor,
    aspp,
    conv_bn_relu,
    inverted_residual,
    make_divisible,
    scaled,
    segmentation_head,
    separable_conv_bn,
)

# MobileNetV2 stages: (expansion, output channels, repeats, first stride).
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LOW_LEVEL_STAGE = 1  # the 24-channel stage ends at stride 4: the decoder's skip features
OUTPUT_STRIDES = (8, 16, 32)


def mobilenetv2_backbone(
    x: Tensor, *, width: float, output_stride: int, l2: float
) -> tuple[Tensor, Tensor]:
    """MobileNetV2 feature extractor; returns ``(features, low_level_features)``."""
    x = conv_bn_relu(
        x,
        make_divisible(32 * width),
        3,
        strides=2,
        activation=None,
        name="stem",
        l2=l2,
        kernel_initializer="glorot_uniform",
    )
    x = keras.layers.ReLU(6.0, name="stem_relu6")(x)
    current_stride, rate, block = 2, 1, 0
    low_level = None
    for stage, (expansion, channels, repeats, first_stride) in enumerate(MOBILENETV2_STAGES):
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            if current_stride == output_stride:
                # Past the output stride: keep resolution and dilate by the skipped stride.
                block_stride, block_rate, rate = 1, rate, rate * stride
            else:
                block_stride, block_rate = stride, 1
                current_stride *= stride
            x = inverted_residual(
                x,
                make_divisible(channels * width),
                expansion=expansion,
                strides=block_stride,
                dilation_rate=block_rate,
                name=f"block{block}",
                l2=l2,
            )
            block += 1
        if stage == LOW_LEVEL_STAGE:
            low_level = x
    return x, low_level


def build_deeplabv3plus(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    output_stride: int = 16,
    atrous_rates: tuple[int, ...] = (6, 12, 18),
    decoder: bool = True,
    dropout: float = 0.1,
) -> keras.Model:
    """Build DeepLabv3+ (MobileNetV2 backbone, ASPP, decoder)."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}; got {output_stride}")
    inputs = keras.Input(shape=input_shape, name="image")
    features, low_level = mobilenetv2_backbone(
        inputs, width=width, output_stride=output_stride, l2=l2
    )
    x = aspp(features, scaled(256, width), tuple(atrous_rates), name="aspp", l2=l2, dropout=dropout)
    if decoder:
        skip = conv_bn_relu(low_level, scaled(48, width), 1, name="decoder_skip", l2=l2)
        x = ResizeLike(name="decoder_resize")([x, skip])
        x = keras.layers.Concatenate(name="decoder_concat")([x, skip])
        x = separable_conv_bn(x, scaled(256, width), name="decoder_conv1", l2=l2)
        x = separable_conv_bn(x, scaled(256, width), name="decoder_conv2", l2=l2)
    outputs = segmentation_head(x, n_classes, l2=l2, resize_to=inputs)
    return keras.Model(inputs, outputs, name="deeplabv3plus")
