"""DenseUnet, small and big (thesis section 5.2.4).

The thesis prints PSPNet's parameter counts for both DenseUnets (a copy error), so there is no
published count to match; the architectures follow the thesis's description and its code.

DenseUnet_s (FC-DenseNet / "Tiramisu" style, required stride 16): a 3x3 stem convolution with 16
filters; five dense blocks of four layers (BN-ReLU-3x3 conv) with growth rates 4, 8, 16, 32, 64;
transition down = 2x max pooling (+ spatial dropout); on the way up, transition up = BN-ReLU-1x1
convolution halving the channels + 2x upsampling, concatenation with the encoder block of the
same size, a BN-ReLU-1x1 "reduction" to a quarter of the channels and a dense block with the
mirrored growth rate. At full resolution a last reduction is concatenated with the stem and
passed through a final growth-4 dense block and the 1x1 softmax classifier. (The thesis's code
meant to do that last step but fed the wrong tensor to the final block, leaving a dead branch;
here the intended wiring is built.)

DenseUnet_b (required stride 32): a DenseNet-121 encoder as in the thesis's code: 7x7/2 stem
convolution with 64 filters and 3x3/2 max pooling, dense blocks of 6, 12, 24, 16 bottleneck
layers (BN-ReLU-1x1 conv to 4x growth, BN-ReLU-3x3 conv) with growth rate 48, DenseNet
transitions (BN-ReLU-1x1 conv, 2x average pooling) with compression 1.0 (the thesis's code
default; DenseNet-BC's 0.5 is available as an option). Decoder (H-DenseUNet style, as in the
thesis's code): at each of five 2x upsamplings the upsampled map is added to a 1x1 projection
(+BN+ReLU) of the encoder map of the same size and a 3x3 convolution+BN+ReLU follows, with
1024, 768, 384, 192, 96, 64 channels from bottom to top; dropout 0.3 and a 1x1 softmax.
"""

import tf_keras as keras

from models.layers import (
    bn_relu_conv,
    conv_bn_relu,
    dense_block,
    densenet_transition,
    scaled,
    segmentation_head,
    transition_down,
    transition_up,
)

SMALL_GROWTH_RATES = (4, 8, 16, 32, 64)
SMALL_LAYERS_PER_BLOCK = 4
SMALL_STEM_FILTERS = 16
BIG_BLOCK_LAYERS = (6, 12, 24, 16)  # DenseNet-121
BIG_GROWTH_RATE = 48
BIG_STEM_FILTERS = 64
BIG_DECODER_FILTERS = (1024, 768, 384, 192, 96, 64)


def build_denseunet_small(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    dropout: float = 0.05,
) -> keras.Model:
    """Build DenseUnet_s (Tiramisu-style; growth rates 4..64 scaled by ``width``)."""
    growth = [scaled(g, width) for g in SMALL_GROWTH_RATES]
    n = SMALL_LAYERS_PER_BLOCK
    inputs = keras.Input(shape=input_shape, name="image")
    stem = conv_bn_relu(inputs, scaled(SMALL_STEM_FILTERS, width), 3, use_bias=True, name="stem")

    x = stem
    skips = []
    for i, g in enumerate(growth[:-1]):
        x = dense_block(x, n, g, name=f"down{i + 1}", l2=l2)
        skips.append(x)
        x = transition_down(x, name=f"td{i + 1}", dropout=dropout)
    x = dense_block(x, n, growth[-1], name="bottom", l2=l2)
    if dropout > 0:
        x = keras.layers.SpatialDropout2D(dropout, name="bottom_drop")(x)

    for i in reversed(range(len(skips))):
        x = transition_up(x, x.shape[-1] // 2, name=f"tu{i + 1}", l2=l2)
        x = keras.layers.Concatenate(name=f"up{i + 1}_concat")([x, skips[i]])
        if dropout > 0:
            x = keras.layers.SpatialDropout2D(dropout, name=f"up{i + 1}_drop")(x)
        # The reduction keeps the up path narrow: the concatenation is 1.5x the skip's width.
        x = bn_relu_conv(x, x.shape[-1] // 4, 1, name=f"up{i + 1}_reduce", l2=l2, use_bias=True)
        x = dense_block(x, n, growth[i], name=f"up{i + 1}", l2=l2)

    x = bn_relu_conv(x, x.shape[-1] // 4, 1, name="final_reduce", l2=l2, use_bias=True)
    x = keras.layers.Concatenate(name="final_concat")([x, stem])
    x = dense_block(x, n, growth[0], name="final", l2=l2)
    return keras.Model(inputs, segmentation_head(x, n_classes, l2=l2), name="denseunet_s")


def build_denseunet_big(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    compression: float = 1.0,
    dropout: float = 0.3,
) -> keras.Model:
    """Build DenseUnet_b (DenseNet-121 layout, growth 48, H-DenseUNet-style decoder)."""
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1]; got {compression}")
    growth = scaled(BIG_GROWTH_RATE, width)
    dec = [scaled(f, width) for f in BIG_DECODER_FILTERS]
    inputs = keras.Input(shape=input_shape, name="image")

    x = conv_bn_relu(inputs, scaled(BIG_STEM_FILTERS, width), 7, strides=2, name="stem", l2=l2)
    skips = [x]  # 1/2
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for i, n_layers in enumerate(BIG_BLOCK_LAYERS):
        x = dense_block(
            x, n_layers, growth, bottleneck=4 * growth, use_bias=False, name=f"dense{i + 1}", l2=l2
        )
        if i < len(BIG_BLOCK_LAYERS) - 1:
            skips.append(x)  # 1/4, 1/8, 1/16
            x = densenet_transition(
                x, int(x.shape[-1] * compression), name=f"transition{i + 1}", l2=l2
            )
    x = keras.layers.BatchNormalization(name="dense4_out_bn")(x)
    x = keras.layers.Activation("relu", name="dense4_out_relu")(x)

    # Bottom projection before upsampling: a 1x1 conv commutes with nearest upsampling, so doing
    # it at 1/32 scale is the same function as after it, at a quarter of the cost.
    x = conv_bn_relu(x, dec[0], 1, name="up0_proj", l2=l2)
    for level, skip in enumerate(reversed(skips)):
        x = keras.layers.UpSampling2D(2, name=f"up{level}_up")(x)
        lateral = conv_bn_relu(skip, dec[level], 1, name=f"up{level}_lateral", l2=l2)
        x = keras.layers.Add(name=f"up{level}_add")([x, lateral])
        x = conv_bn_relu(x, dec[level + 1], 3, name=f"up{level}_conv", l2=l2)
    x = keras.layers.UpSampling2D(2, name="up4_up")(x)
    x = conv_bn_relu(x, dec[-1], 3, name="up4_conv", l2=l2)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="up4_drop")(x)
    return keras.Model(inputs, segmentation_head(x, n_classes, l2=l2), name="denseunet_b")
