"""Shared building blocks of the seven segmentation networks.

Every block is a plain function that takes a Keras tensor and returns one (functional API),
names its layers with a caller-given prefix (deterministic names make checkpoints readable and
allow loading by name), and puts the optional L2 penalty on every convolution kernel.

Conventions used throughout:

- channel-last tensors; ``dims`` selects 2D or 3D layers where a block is used by Unet3D;
- ``l2`` is the L2 factor for kernel regularisers (0 disables it; the thesis trained with 1e-4);
- ``he_normal`` initialisation for the U-Net style blocks (as in the thesis), Keras defaults
  elsewhere (Glorot uniform), which only changes the starting point, never the parameter count.
"""

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tf_keras as keras

layers = keras.layers

# Keras functional tensors; typed loosely because tf_keras' KerasTensor is not a public class.
Tensor = Any


def l2_regularizer(l2: float) -> keras.regularizers.Regularizer | None:
    """Kernel regulariser for factor ``l2``, or None when ``l2`` is 0 (no penalty, no overhead)."""
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0; got {l2}")
    return keras.regularizers.l2(l2) if l2 > 0 else None


def scaled(n: int, width: float, minimum: int = 1) -> int:
    """Channel count ``n`` multiplied by the width factor, rounded, at least ``minimum``."""
    return max(minimum, int(round(n * width)))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (MobileNetV2's rule).

    Never goes more than 10 % below ``value``; this is the rounding the MobileNetV2 paper and all
    its Keras ports use, so that width multipliers give the same channel counts as elsewhere.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _conv_cls(dims: int) -> type[layers.Layer]:
    if dims == 2:
        return layers.Conv2D
    if dims == 3:
        return layers.Conv3D
    raise ValueError(f"dims must be 2 or 3; got {dims}")


def _maxpool_cls(dims: int) -> type[layers.Layer]:
    return layers.MaxPooling2D if dims == 2 else layers.MaxPooling3D


def _upsampling_cls(dims: int) -> type[layers.Layer]:
    return layers.UpSampling2D if dims == 2 else layers.UpSampling3D


@keras.utils.register_keras_serializable(package="kits_models")
class ResizeLike(layers.Layer):
    """Bilinear resize of ``inputs[0]`` to the spatial size of ``inputs[1]`` (2D, channel-last).

    The target size is read from the reference tensor at run time, so models with ``None``
    spatial dimensions still work; the static shape is restored afterwards so that downstream
    layers (and ``model.output_shape``) see known sizes whenever the input had them.
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        x, reference = inputs
        out = tf.image.resize(x, tf.shape(reference)[1:3], method=self.interpolation)
        out = tf.cast(out, x.dtype)
        out.set_shape([x.shape[0], reference.shape[1], reference.shape[2], x.shape[-1]])
        return out

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        x_shape, ref_shape = (tuple(s) for s in input_shape)
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "interpolation": self.interpolation}


def segmentation_head(
    x: Tensor, n_classes: int, *, l2: float = 0.0, dims: int = 2, resize_to: Tensor | None = None
) -> Tensor:
    """The output head of every model: 1x1 classifier ``classifier``, softmax ``softmax``.

    ``resize_to`` (2D) resizes the class scores to that tensor's spatial size before the softmax
    (PSPNet and DeepLabv3+ classify at feature resolution). The softmax layer computes in
    float32 whatever the global policy is: under mixed_float16 a float16 softmax of large logits
    overflows or rounds to probabilities that do not sum to 1, which a later cast cannot repair.
    """
    x = _conv_cls(dims)(n_classes, 1, kernel_regularizer=l2_regularizer(l2), name="classifier")(x)
    if resize_to is not None:
        x = ResizeLike(name="classifier_resize")([x, resize_to])
    return layers.Activation("softmax", dtype="float32", name="softmax")(x)


# --------------------------------------------------------------------------------------------
# Plain convolution units
# --------------------------------------------------------------------------------------------


def conv_relu_bn(
    x: Tensor,
    filters: int,
    kernel_size: int | tuple[int, ...],
    *,
    name: str,
    l2: float = 0.0,
    dims: int = 2,
    use_bias: bool = True,
) -> Tensor:
    """Convolution with ReLU, then BatchNormalization: the thesis's U-Net unit.

    The thesis's U-Nets (and the small PSPNet's encoder) put BN *after* the ReLU and keep the
    convolution bias; both are kept because the published parameter counts include that bias.
    """
    x = _conv_cls(dims)(
        filters,
        kernel_size,
        padding="same",
        activation="relu",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        kernel_regularizer=l2_regularizer(l2),
        name=f"{name}_conv",
    )(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def conv_bn_relu(
    x: Tensor,
    filters: int,
    kernel_size: int | tuple[int, ...],
    *,
    name: str,
    l2: float = 0.0,
    strides: int = 1,
    dilation_rate: int = 1,
    use_bias: bool = False,
    activation: str | None = "relu",
    kernel_initializer: str = "he_normal",
) -> Tensor:
    """2D convolution, BatchNormalization, then ``activation`` (None: BN output, linear).

    The standard post-activation unit of ResNet, PSPNet, DenseNet decoders and DeepLab. No bias by
    default, since BN's beta makes it redundant.
    """
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=l2_regularizer(l2),
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if activation is not None:
        x = layers.Activation(activation, name=f"{name}_{activation}")(x)
    return x


def bn_relu_conv(
    x: Tensor,
    filters: int,
    kernel_size: int,
    *,
    name: str,
    l2: float = 0.0,
    use_bias: bool = False,
) -> Tensor:
    """BatchNormalization, ReLU, then a 2D convolution: DenseNet's pre-activation unit."""
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    return layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        kernel_regularizer=l2_regularizer(l2),
        name=f"{name}_conv",
    )(x)


# --------------------------------------------------------------------------------------------
# U-Net blocks (Unet2D, Unet3D)
# --------------------------------------------------------------------------------------------


def unet_encoder_block(
    x: Tensor, filters: int, *, n_convs: int = 2, name: str, l2: float = 0.0, dims: int = 2
) -> tuple[Tensor, Tensor]:
    """U-Net encoder level: ``n_convs`` 3x3 conv+ReLU+BN units, then 2x max pooling.

    Returns ``(skip, pooled)``: the last unit's output (for the decoder's skip connection) and
    its pooled version (input of the next level).
    """
    for i in range(n_convs):
        x = conv_relu_bn(x, filters, 3, name=f"{name}_c{i + 1}", l2=l2, dims=dims)
    pooled = _maxpool_cls(dims)(2, name=f"{name}_pool")(x)
    return x, pooled


def unet_decoder_block(
    x: Tensor, skip: Tensor, filters: int, *, n_convs: int = 2, name: str, l2: float = 0.0
) -> Tensor:
    """U-Net decoder level (2D): 2x upsampling, 2x2 conv unit, concat with skip, 3x3 conv units.

    The "upsample then 2x2 convolution" form of up-convolution is the one the thesis's Unet2D
    used (it is what its 2,465,619 parameters count).
    """
    x = layers.UpSampling2D(2, name=f"{name}_up")(x)
    x = conv_relu_bn(x, filters, 2, name=f"{name}_upconv", l2=l2)
    x = layers.Concatenate(name=f"{name}_concat")([skip, x])
    for i in range(n_convs):
        x = conv_relu_bn(x, filters, 3, name=f"{name}_c{i + 1}", l2=l2)
    return x


def residual_concat_block(
    x: Tensor, filters: int, *, name: str, l2: float = 0.0, dims: int = 3, bn_last: bool = True
) -> tuple[Tensor, Tensor]:
    """Level of the "dense" U-Net (MIScnn style) used by the thesis's Unet3D.

    BN on the level's input, conv+ReLU, BN, conv+ReLU, optionally BN, then concatenation of the
    normalised input with the last convolution's output (a short dense connection that lets the
    level pass its input through unchanged). Returns ``(concat, last_conv)``: encoder levels pool
    the concatenation but hand ``last_conv`` to the decoder as the skip link.
    """
    x_in = layers.BatchNormalization(name=f"{name}_in_bn")(x)
    y = conv_relu_bn(x_in, filters, 3, name=f"{name}_c1", l2=l2, dims=dims)
    y = _conv_cls(dims)(
        filters,
        3,
        padding="same",
        activation="relu",
        kernel_initializer="he_normal",
        kernel_regularizer=l2_regularizer(l2),
        name=f"{name}_c2_conv",
    )(y)
    if bn_last:
        y = layers.BatchNormalization(name=f"{name}_c2_bn")(y)
    return layers.Concatenate(name=f"{name}_concat")([x_in, y]), y


# --------------------------------------------------------------------------------------------
# Dense blocks (DenseUnet small and big)
# --------------------------------------------------------------------------------------------


def dense_layer(
    x: Tensor,
    growth_rate: int,
    *,
    name: str,
    l2: float = 0.0,
    bottleneck: int | None = None,
    use_bias: bool = True,
) -> Tensor:
    """One layer of a dense block: [BN-ReLU-1x1 bottleneck,] BN-ReLU-3x3 conv with ``growth_rate``
    filters; returns only the new feature maps (the caller concatenates)."""
    if bottleneck:
        x = bn_relu_conv(x, bottleneck, 1, name=f"{name}_x1", l2=l2, use_bias=use_bias)
    return bn_relu_conv(x, growth_rate, 3, name=f"{name}_x2", l2=l2, use_bias=use_bias)


def dense_block(
    x: Tensor,
    n_layers: int,
    growth_rate: int,
    *,
    name: str,
    l2: float = 0.0,
    bottleneck: int | None = None,
    use_bias: bool = True,
) -> Tensor:
    """Dense block: ``n_layers`` dense layers, each fed the concatenation of all earlier maps.

    Output channels = input channels + ``n_layers * growth_rate``.
    """
    for i in range(n_layers):
        new = dense_layer(
            x, growth_rate, name=f"{name}_l{i + 1}", l2=l2, bottleneck=bottleneck, use_bias=use_bias
        )
        x = layers.Concatenate(name=f"{name}_l{i + 1}_concat")([x, new])
    return x


def transition_down(x: Tensor, *, name: str, dropout: float = 0.0) -> Tensor:
    """Tiramisu transition down as the thesis's DenseUnet_s did it: 2x max pooling only
    (optionally followed by spatial dropout)."""
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    if dropout > 0:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_drop")(x)
    return x


def densenet_transition(x: Tensor, filters: int, *, name: str, l2: float = 0.0) -> Tensor:
    """DenseNet transition: BN-ReLU-1x1 convolution to ``filters`` channels, 2x average pooling."""
    x = bn_relu_conv(x, filters, 1, name=name, l2=l2)
    return layers.AveragePooling2D(2, name=f"{name}_pool")(x)


def transition_up(x: Tensor, filters: int, *, name: str, l2: float = 0.0) -> Tensor:
    """Transition up: BN-ReLU-1x1 convolution to ``filters`` channels, then 2x upsampling."""
    x = bn_relu_conv(x, filters, 1, name=name, l2=l2, use_bias=True)
    return layers.UpSampling2D(2, name=f"{name}_up")(x)


# --------------------------------------------------------------------------------------------
# ResNet (PSPNet_b encoder)
# --------------------------------------------------------------------------------------------


def resnet_bottleneck(
    x: Tensor,
    filters: int,
    *,
    name: str,
    strides: int = 1,
    dilation_rate: int = 1,
    project: bool = False,
    l2: float = 0.0,
) -> Tensor:
    """ResNet-50 bottleneck: 1x1 (``filters``) - 3x3 (dilated) - 1x1 (``4 * filters``), each with
    BN, plus the identity or (``project``) a strided 1x1 projection shortcut; ReLU after the sum.

    The stride sits on the first 1x1 convolution (Caffe/PSPNet style) and dilation replaces the
    stride in the deeper stages, which keeps the feature map at 1/8 of the input.
    """
    y = conv_bn_relu(x, filters, 1, strides=strides, name=f"{name}_reduce", l2=l2)
    y = conv_bn_relu(y, filters, 3, dilation_rate=dilation_rate, name=f"{name}_3x3", l2=l2)
    y = conv_bn_relu(y, 4 * filters, 1, activation=None, name=f"{name}_increase", l2=l2)
    if project:
        shortcut = conv_bn_relu(
            x, 4 * filters, 1, strides=strides, activation=None, name=f"{name}_proj", l2=l2
        )
    else:
        shortcut = x
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


def resnet_stage(
    x: Tensor,
    filters: int,
    n_blocks: int,
    *,
    name: str,
    strides: int = 1,
    dilation_rate: int = 1,
    l2: float = 0.0,
) -> Tensor:
    """A ResNet stage: one projecting bottleneck followed by ``n_blocks - 1`` identity ones."""
    x = resnet_bottleneck(
        x,
        filters,
        strides=strides,
        dilation_rate=dilation_rate,
        project=True,
        name=f"{name}_b1",
        l2=l2,
    )
    for i in range(1, n_blocks):
        x = resnet_bottleneck(
            x, filters, dilation_rate=dilation_rate, name=f"{name}_b{i + 1}", l2=l2
        )
    return x


# --------------------------------------------------------------------------------------------
# Context modules (PSPNet, DeepLab)
# --------------------------------------------------------------------------------------------


def pyramid_pooling_module(
    source: Tensor,
    target: Tensor,
    pool_sizes: Sequence[int],
    filters: int,
    *,
    name: str,
    l2: float = 0.0,
) -> Tensor:
    """PSPNet's pyramid pooling module with fixed pooling windows.

    For each ``k`` in ``pool_sizes``: average pooling with kernel = stride = ``k`` on ``source``,
    1x1 convolution to ``filters`` channels + BN + ReLU, bilinear resize to ``target``'s size.
    Returns ``target`` concatenated with all branches. (The thesis used fixed windows
    ``2^(4-i)`` rather than PSPNet's adaptive 1/2/3/6 bins; with a fixed window the input size
    must be a multiple of the largest window times the source's stride.)
    """
    branches = [target]
    for k in pool_sizes:
        b = layers.AveragePooling2D(k, strides=k, name=f"{name}_pool{k}")(source)
        b = conv_bn_relu(b, filters, 1, name=f"{name}_pool{k}", l2=l2)
        b = ResizeLike(name=f"{name}_pool{k}_resize")([b, target])
        branches.append(b)
    return layers.Concatenate(name=f"{name}_concat")(branches)


def separable_conv_bn(
    x: Tensor,
    filters: int,
    *,
    name: str,
    dilation_rate: int = 1,
    l2: float = 0.0,
) -> Tensor:
    """Atrous separable convolution of DeepLabv3+: depthwise 3x3 (dilated) + BN + ReLU, then
    pointwise 1x1 to ``filters`` + BN + ReLU."""
    x = layers.DepthwiseConv2D(
        3,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        depthwise_regularizer=l2_regularizer(l2),
        name=f"{name}_depthwise",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_depthwise_bn")(x)
    x = layers.Activation("relu", name=f"{name}_depthwise_relu")(x)
    return conv_bn_relu(x, filters, 1, name=f"{name}_pointwise", l2=l2)


def aspp(
    x: Tensor,
    filters: int,
    rates: Sequence[int],
    *,
    name: str,
    l2: float = 0.0,
    dropout: float = 0.1,
) -> Tensor:
    """Atrous Spatial Pyramid Pooling (DeepLabv3/v3+).

    Branches: global average pooling (image-level features) + 1x1 conv, a plain 1x1 conv, and one
    atrous separable 3x3 conv per rate; concatenated and projected by a 1x1 conv (+ dropout).
    With ``rates=()`` it is the two-branch head that the thesis's MobileNetV2 DeepLab had.
    """
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_image_pool")(x)
    pooled = conv_bn_relu(pooled, filters, 1, name=f"{name}_image", l2=l2)
    branches = [ResizeLike(name=f"{name}_image_resize")([pooled, x])]
    branches.append(conv_bn_relu(x, filters, 1, name=f"{name}_1x1", l2=l2))
    for rate in rates:
        branches.append(
            separable_conv_bn(x, filters, dilation_rate=rate, name=f"{name}_r{rate}", l2=l2)
        )
    y = layers.Concatenate(name=f"{name}_concat")(branches)
    y = conv_bn_relu(y, filters, 1, name=f"{name}_projection", l2=l2)
    if dropout > 0:
        y = layers.Dropout(dropout, name=f"{name}_drop")(y)
    return y


# --------------------------------------------------------------------------------------------
# MobileNetV2 (DeepLabv3+ backbone)
# --------------------------------------------------------------------------------------------


def inverted_residual(
    x: Tensor,
    filters: int,
    *,
    expansion: int,
    name: str,
    strides: int = 1,
    dilation_rate: int = 1,
    l2: float = 0.0,
) -> Tensor:
    """MobileNetV2 inverted residual: 1x1 expansion (skipped when ``expansion`` is 1) + BN +
    ReLU6, depthwise 3x3 (strided or dilated) + BN + ReLU6, linear 1x1 projection + BN; identity
    shortcut when the shape is unchanged."""
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = layers.Conv2D(
            expansion * in_channels,
            1,
            use_bias=False,
            kernel_regularizer=l2_regularizer(l2),
            name=f"{name}_expand",
        )(y)
        y = layers.BatchNormalization(name=f"{name}_expand_bn")(y)
        y = layers.ReLU(6.0, name=f"{name}_expand_relu6")(y)
    y = layers.DepthwiseConv2D(
        3,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=False,
        depthwise_regularizer=l2_regularizer(l2),
        name=f"{name}_depthwise",
    )(y)
    y = layers.BatchNormalization(name=f"{name}_depthwise_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_depthwise_relu6")(y)
    y = layers.Conv2D(
        filters, 1, use_bias=False, kernel_regularizer=l2_regularizer(l2), name=f"{name}_project"
    )(y)
    y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
    if strides == 1 and in_channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y
