"""PSPNet, small and big (thesis section 5.2.3).

Both end in the thesis's pyramid pooling module: four branches of average pooling with kernel
= stride = ``2^(4-i)``, i = 0..3 (16, 8, 4, 2), each followed by a 1x1 convolution + BN + ReLU and
a bilinear resize to the encoder's feature map, concatenated with that feature map; then a
convolution + BN + ReLU + dropout, a 1x1 classifier, a bilinear resize to the input size and a
softmax.

PSPNet_s (1,651,331 parameters, exactly the thesis's count): a small encoder
conv3x3(64)-pool-conv2x2(128)-conv3x3(256)-pool (conv+ReLU then BN, with bias) giving a
1/4-size 256-channel map (32x32x256 for 128x128 input); 256 channels per pyramid branch; 2x2
head convolution with 256 filters. In the thesis's published code the pyramid pools the *input
image* (3 channels) rather than the encoder output, and its count counts that: this is the
default, ``ppm_source="image"``. ``ppm_source="features"`` pools the encoder output, as in the
PSPNet paper (1,910,403 parameters). Required stride: 16 (image) or 64 (features: the 16-pixel
window runs on a 1/4-size map).

PSPNet_b (46,765,763 parameters, exactly the thesis's count): the PSPNet flavour of ResNet-50
(three 3x3 stem convolutions 64-64-128 and 3x3 max pooling, bottleneck stages 3-4-6-3, stride on
the first 1x1 of a stage, stages 4 and 5 dilated by 2 and 4 instead of strided), so the encoder
output is 1/8 of the input with 2048 channels (16x16x2048 for 128x128 input; the thesis's
"60x60x4096" is the size for PSPNet's usual 473x473 input *after* the pyramid concatenation);
512 channels per pyramid branch, 3x3 head convolution with 512 filters. Required stride: 128
(the 16-pixel window runs on a 1/8-size map).
"""

import tf_keras as keras

from models.layers import (
    Tensor,
    conv_bn_relu,
    conv_relu_bn,
    pyramid_pooling_module,
    resnet_stage,
    scaled,
    segmentation_head,
)

PPM_POOL_SIZES = tuple(2 ** (4 - i) for i in range(4))  # (16, 8, 4, 2), thesis's 2^(4-i)
PPM_SOURCES = ("image", "features")


def _check_source(ppm_source: str) -> None:
    if ppm_source not in PPM_SOURCES:
        raise ValueError(f"ppm_source must be one of {PPM_SOURCES}; got {ppm_source!r}")


def _psp_head(
    inputs: Tensor,
    features: Tensor,
    pyramid: Tensor,
    n_classes: int,
    *,
    filters: int,
    kernel_size: int,
    dropout: float,
    l2: float,
) -> Tensor:
    """Head shared by both PSPNets: conv+BN+ReLU, dropout, 1x1 classifier, resize, softmax."""
    x = conv_bn_relu(pyramid, filters, kernel_size, name="head", l2=l2)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_drop")(x)
    # Classify at feature resolution, then resize the class scores to the input (as PSPNet does).
    return segmentation_head(x, n_classes, l2=l2, resize_to=inputs)


def build_pspnet_small(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    ppm_source: str = "image",
    dropout: float = 0.1,
) -> keras.Model:
    """Build PSPNet_s (small custom encoder, 256-channel pyramid)."""
    _check_source(ppm_source)
    inputs = keras.Input(shape=input_shape, name="image")
    x = conv_relu_bn(inputs, scaled(64, width), 3, name="enc1", l2=l2)
    x = keras.layers.MaxPooling2D(2, name="enc1_pool")(x)
    x = conv_relu_bn(x, scaled(128, width), 2, name="enc2", l2=l2)
    x = conv_relu_bn(x, scaled(256, width), 3, name="enc3", l2=l2)
    features = keras.layers.MaxPooling2D(2, name="enc3_pool")(x)
    source = inputs if ppm_source == "image" else features
    pyramid = pyramid_pooling_module(
        source, features, PPM_POOL_SIZES, scaled(256, width), name="ppm", l2=l2
    )
    outputs = _psp_head(
        inputs,
        features,
        pyramid,
        n_classes,
        filters=scaled(256, width),
        kernel_size=2,
        dropout=dropout,
        l2=l2,
    )
    return keras.Model(inputs, outputs, name="pspnet_s")


def build_pspnet_big(
    input_shape: tuple[int | None, ...] = (128, 128, 3),
    n_classes: int = 3,
    *,
    l2: float = 0.0,
    width: float = 1.0,
    dropout: float = 0.1,
) -> keras.Model:
    """Build PSPNet_b (dilated ResNet-50 encoder at output stride 8, 512-channel pyramid)."""
    inputs = keras.Input(shape=input_shape, name="image")
    # PSPNet's deep stem: three 3x3 convolutions instead of ResNet's single 7x7.
    x = conv_bn_relu(inputs, scaled(64, width), 3, strides=2, name="stem1", l2=l2)
    x = conv_bn_relu(x, scaled(64, width), 3, name="stem2", l2=l2)
    x = conv_bn_relu(x, scaled(128, width), 3, name="stem3", l2=l2)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    x = resnet_stage(x, scaled(64, width), 3, name="res2", l2=l2)
    x = resnet_stage(x, scaled(128, width), 4, strides=2, name="res3", l2=l2)
    # Stages 4 and 5 trade their stride for dilation: output stride 8 instead of 32.
    x = resnet_stage(x, scaled(256, width), 6, dilation_rate=2, name="res4", l2=l2)
    features = resnet_stage(x, scaled(512, width), 3, dilation_rate=4, name="res5", l2=l2)
    pyramid = pyramid_pooling_module(
        features, features, PPM_POOL_SIZES, scaled(512, width), name="ppm", l2=l2
    )
    outputs = _psp_head(
        inputs,
        features,
        pyramid,
        n_classes,
        filters=scaled(512, width),
        kernel_size=3,
        dropout=dropout,
        l2=l2,
    )
    return keras.Model(inputs, outputs, name="pspnet_b")
