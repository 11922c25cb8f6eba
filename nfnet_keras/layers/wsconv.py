"""Scaled Weight Standardization convolution (Brock et al. 2021, arXiv 2101.08692)."""

import functools
import inspect

import keras
import numpy as np
from keras import ops

from nfnet_keras import hardware
from nfnet_keras.layers.activations import tensorflow_on_cpu_only


@functools.cache
def _cpu_lacks_bfloat16():
    return hardware.cpu_has_fast_bfloat16() is False


def emulated_bfloat16():
    """Whether bfloat16 runs on TensorFlow's reference kernels here: a CPU with no bfloat16 kernels, no GPU.

    There a bfloat16 matmul neither runs fast nor accumulates in float32, so the bfloat16 paths
    below that rely on both (the bias gradient's matrix-vector sum, the tap-matmul filter gradient)
    are not taken.
    """
    return tensorflow_on_cpu_only() and _cpu_lacks_bfloat16()


def add_channel_bias(outputs, bias):
    """`outputs + bias` over the last axis, with the bias gradient as its own reduction.

    Keras adds a conv's bias with a broadcast add; on CPUs TensorFlow's oneDNN
    rewrite then fuses the filter and bias gradients into one
    `_MklNativeConv2DBackpropFilterWithBias` kernel, which measured ~1.9x the
    time of the bias-free filter gradient here (the seed net trains ~1.35x
    faster without it; see the README's benchmarks and
    https://github.com/uxlfoundation/oneDNN/issues/895 for the same cost of
    fused bias gradients in oneDNN). Giving the add a custom gradient, a plain
    sum over batch and space, keeps the two apart. Same values, same gradients.
    Low-precision gradients are summed in float32; a bfloat16 one as a
    matrix-vector product with ones, which reads it once. On other backends this
    is the ordinary broadcast add.
    """
    bias = ops.cast(bias, outputs.dtype)
    if keras.backend.backend() != "tensorflow":
        return ops.add(outputs, ops.reshape(bias, (1,) * (len(outputs.shape) - 1) + (-1,)))
    import tensorflow as tf

    @tf.custom_gradient
    def add(x, b):
        def grad(g):
            flat = tf.reshape(g, [-1, tf.shape(g)[-1]])
            if flat.dtype == tf.bfloat16 and not emulated_bfloat16():
                # ones @ flat: a bfloat16 matrix-vector product accumulates in float32 and reads the
                # gradient once; casting it to float32 to sum wrote and read a float32 copy, and took
                # 4-9x longer on the speed network's feature maps (same sums, rounded once).
                ones = tf.ones([1, tf.shape(flat)[0]], flat.dtype)
                return g, tf.reshape(tf.matmul(ones, flat), [-1])
            if flat.dtype != tf.float32:  # accumulate low-precision gradients in float32
                return g, tf.cast(tf.reduce_sum(tf.cast(flat, tf.float32), axis=0), flat.dtype)
            return g, tf.reduce_sum(flat, axis=0)

        return x + b, grad

    return add(outputs, bias)


# When `conv2d` takes the filter gradient as one matmul per kernel tap (see its docstring): a
# bfloat16 conv on TensorFlow without a GPU, stride and dilation 1, maps of at most this many
# positions, and both channel counts at least `TAP_MATMUL_MIN_CHANNELS`. `python -m
# benchmarks.conv_grad` measures the crossover (benchmarks/results/conv_grad.json; a 2-core
# AVX-512/AMX Xeon, batch 512): in bfloat16 the taps took 0.12-0.82x TensorFlow's time on maps of
# 3x3 to 11x11 with 256-384 channels, and 1.3-2.7x with 24-64 channels at every size; in float32
# TensorFlow's op won at all but one shape. float16 was not measured.
TAP_MATMUL_MAX_POSITIONS = 121
TAP_MATMUL_MIN_CHANNELS = 128


def uses_tap_matmul(input_shape, kernel_shape, dtype, strides=(1, 1), dilation_rate=(1, 1)):
    """Whether `conv2d` computes this convolution's filter gradient by tap matmuls."""
    if keras.backend.standardize_dtype(dtype) != "bfloat16" or not tensorflow_on_cpu_only() or emulated_bfloat16():
        return False
    if tuple(strides) != (1, 1) or tuple(dilation_rate) != (1, 1):
        return False
    h, w = input_shape[1], input_shape[2]
    if h is None or w is None or h * w > TAP_MATMUL_MAX_POSITIONS:
        return False
    return min(kernel_shape[2], kernel_shape[3]) >= TAP_MATMUL_MIN_CHANNELS


def tap_matmul_filter_gradient(inputs, upstream, kernel_shape, padding):
    """The gradient of a stride-1 NHWC conv's `(kh, kw, c_in, c_out)` kernel, one matmul per tap.

    Tap `(i, j)` of the kernel gradient is `x_ij^T @ g`, where `x_ij` is the
    (padded) input shifted by the tap, flattened to `(N*H*W, c_in)`, and `g`
    the upstream gradient flattened to `(N*H*W, c_out)`: `kh * kw` plain
    matmuls, each accumulating over the batch and all positions.
    """
    import tensorflow as tf

    kh, kw, c_in, c_out = kernel_shape
    if padding == "same":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        inputs = tf.pad(inputs, [[0, 0], [top, kh - 1 - top], [left, kw - 1 - left], [0, 0]])
    h, w = inputs.shape[1] - kh + 1, inputs.shape[2] - kw + 1  # the output's size (static, as the rule asks)
    flat_upstream = tf.reshape(upstream, [-1, c_out])
    taps = [tf.matmul(tf.reshape(inputs[:, i:i + h, j:j + w, :], [-1, c_in]), flat_upstream, transpose_a=True)
            for i in range(kh) for j in range(kw)]
    return tf.reshape(tf.stack(taps), [kh, kw, c_in, c_out])


def conv2d(inputs, kernel, strides=(1, 1), padding="valid", dilation_rate=(1, 1)):
    """An NHWC convolution (`keras.ops.conv`), its filter gradient by tap matmuls where that is faster.

    On CPUs, TensorFlow's oneDNN filter gradient of a bfloat16 conv with many
    channels on small maps runs far below the matmul rate (7x7 maps with 384
    channels: 2.6x the time of the same sums done as `tap_matmul_filter_gradient`).
    Where `uses_tap_matmul` says so, the conv gets a custom gradient: the input
    gradient from TensorFlow's own op, the filter gradient from the tap matmuls.
    Same values and gradients (up to rounding) everywhere else.
    """
    if not uses_tap_matmul(inputs.shape, kernel.shape, inputs.dtype, strides, dilation_rate):
        return ops.conv(inputs, kernel, strides=list(strides), padding=padding, dilation_rate=dilation_rate,
                        data_format="channels_last")
    import tensorflow as tf

    tf_padding = padding.upper()

    @tf.custom_gradient
    def convolve(x, k):
        def grad(g):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=k, out_backprop=g,
                                                strides=[1, 1, 1, 1], padding=tf_padding)
            return dx, tap_matmul_filter_gradient(x, g, k.shape, padding)

        return tf.nn.conv2d(x, k, 1, tf_padding), grad

    return convolve(inputs, kernel)


@keras.saving.register_keras_serializable(package="nfnet_keras")
class WSConv2D(keras.layers.Conv2D):
    """A 2D convolution whose kernel is standardized over its fan-in on every call.

    The kernel actually convolved is
    `W_hat = gain * (W - mean(W)) / sqrt(max(N * var(W), eps))`, with the mean and
    the (biased) variance taken per output channel over its fan-in
    `N = kernel_h * kernel_w * in_channels / groups`, and `gain` a learnable
    per-output-channel weight initialised to 1. Standardizing in the forward pass
    (not as a constraint after the update) keeps the gradient flowing through the
    standardization, as in the paper. The statistics are computed in float32 even
    under a mixed-precision policy.

    Grouped convolutions run as one convolution per group and a concatenation,
    built from standard ops: Keras' TensorFlow backend otherwise XLA-compiles a
    grouped conv on every device, which a TF Serving model server (XLA off by
    default) refuses to load.

    Args:
        filters: int. Number of output channels.
        kernel_size: int or tuple of 2 ints. Size of the kernel.
        eps: float. Lower bound of `N * var(W)`, which keeps a constant filter
            finite. Defaults to `1e-4`.
        center: bool. Whether each filter's mean is subtracted. `False`: each
            filter is only scaled to unit norm, `gain * W / sqrt(max(sum(W^2), eps))`
            (the filters of KellerJordan's airbench without BatchNorm, which a
            constant input does not cancel). Defaults to `True`.
        gain_initializer: initializer of the per-channel gain. Defaults to `"ones"`.
        kernel_initializer: initializer of the raw kernel. Defaults to He (fan-in)
            normal, `"he_normal"`.
        **kwargs: every other `keras.layers.Conv2D` argument (`strides`, `padding`,
            `groups`, `use_bias`, ...). `data_format` must be `"channels_last"`.

    Example:

    >>> conv = WSConv2D(8, 3, padding="same")
    >>> conv(keras.ops.ones((2, 16, 16, 3))).shape
    (2, 16, 16, 8)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        eps=1e-4,
        gain_initializer="ones",
        kernel_initializer="he_normal",
        center=True,
        **kwargs,
    ):
        if kwargs.get("data_format", "channels_last") not in (None, "channels_last"):
            raise ValueError(
                "WSConv2D supports data_format='channels_last' only; "
                f"got {kwargs['data_format']!r}."
            )
        super().__init__(
            filters, kernel_size, kernel_initializer=kernel_initializer, **kwargs
        )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}.")
        self.eps = float(eps)
        self.center = bool(center)
        self.gain_initializer = keras.initializers.get(gain_initializer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        super().build(input_shape)
        self.gain = self.add_weight(
            name="gain",
            shape=(self.filters,),
            initializer=self.gain_initializer,
            trainable=True,
        )

    def standardized_kernel(self, kernel=None, scale=None):
        """Returns the standardized, gained kernel (float32), times `scale` if given.

        `scale` is a scalar (float or tensor) folded into the per-channel factor.
        """
        kernel = ops.cast(self._kernel if kernel is None else kernel, "float32")
        if self.center:
            fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
            squares = ops.var(kernel, axis=(0, 1, 2), keepdims=True) * fan_in
            kernel = kernel - ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        else:
            squares = ops.sum(ops.square(kernel), axis=(0, 1, 2), keepdims=True)
        factor = ops.rsqrt(ops.maximum(squares, self.eps))
        factor = factor * ops.cast(self.gain, "float32")
        if scale is not None:
            factor = factor * ops.cast(scale, "float32")
        return kernel * factor

    def standardize_outputs(self, mean, var, eps=1e-5):
        """Rescales the gain and shifts the bias so that outputs of these moments get mean 0 and variance 1.

        `mean` and `var` are per-channel moments of this conv's outputs on some
        data (or of a map of them that commutes with a positive scale and a
        shift per channel, such as max-pooling). The outputs `y` become
        `(y - mean) / sqrt(var + eps)`: the gain is divided by that standard
        deviation and, with a bias, the bias becomes `(bias - mean) / std`;
        without one only the scale is set. The filters are not touched.

        Args:
            mean: array `(filters,)`.
            var: array `(filters,)`, >= 0.
            eps: float added to `var`.
        """
        std = np.sqrt(np.asarray(var, "float64") + eps)
        self.gain.assign((np.asarray(ops.convert_to_numpy(self.gain), "float64") / std).astype("float32"))
        if self.use_bias:
            bias = np.asarray(ops.convert_to_numpy(self.bias), "float64")
            self.bias.assign(((bias - np.asarray(mean, "float64")) / std).astype("float32"))

    def call(self, inputs, input_scale=None, output_scale=None):
        """The convolution, with optional scalar scales folded into the kernel.

        `layer(x, input_scale=a, output_scale=s)` equals `layer(x * a) * s` but
        multiplies the (small) kernel and bias instead of the (large) activations:
        an NF block's activation gains, `1 / beta` and skip gain cost no
        elementwise pass over its feature maps this way.

        Args:
            inputs: the input feature map.
            input_scale: scalar multiplying the input (the kernel only).
            output_scale: scalar multiplying the output (kernel and bias); may be
                a variable, whose gradient then flows through the kernel.
        """
        scale = input_scale
        if output_scale is not None:
            output_scale = ops.cast(output_scale, "float32")
            scale = output_scale if scale is None else output_scale * ops.cast(scale, "float32")
        outputs = self._convolve(inputs, self.kernel, scale)
        if self.use_bias:
            bias = self.bias
            if output_scale is not None:
                bias = ops.cast(bias, "float32") * output_scale
            outputs = add_channel_bias(outputs, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def convolution_op(self, inputs, kernel):
        return self._convolve(inputs, kernel, None)

    def _convolve(self, inputs, kernel, scale):
        kernel = ops.cast(self.standardized_kernel(kernel, scale), inputs.dtype)
        conv = lambda x, k: conv2d(x, k, self.strides, self.padding, self.dilation_rate)
        if self.groups == 1:
            return conv(inputs, kernel)
        xs = ops.split(inputs, self.groups, axis=-1)
        ks = ops.split(kernel, self.groups, axis=-1)
        return ops.concatenate([conv(x, k) for x, k in zip(xs, ks)], axis=-1)

    # Keras 3.15's BaseConv saves and loads only [kernel, bias]: the gain would
    # be lost on save and the load would fail ("expected 3 variables"). Store
    # every variable of this layer under its own index.
    def _own_variables(self):
        variables = [self._kernel]
        if self.use_bias:
            variables.append(self.bias)
        variables.append(self.gain)
        return variables

    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self._own_variables()):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._own_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer {self.name!r} expected {len(variables)} variables "
                f"(kernel{', bias' if self.use_bias else ''}, gain) but the saved "
                f"file holds {len(store.keys())}; was it saved by a different "
                "version of WSConv2D?"
            )
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    def get_config(self):
        config = super().get_config()
        config["eps"] = self.eps
        config["center"] = self.center
        config["gain_initializer"] = keras.initializers.serialize(self.gain_initializer)
        return config


@functools.cache
def folds_scales(conv_class):
    """Whether `conv_class.call` takes `input_scale` and `output_scale` (as `WSConv2D`'s does)."""
    params = inspect.signature(conv_class.call).parameters
    return "input_scale" in params and "output_scale" in params


def scaled_conv(conv, inputs, input_scale=None, output_scale=None):
    """`conv(inputs * input_scale) * output_scale`, the scalars folded into the kernel where `conv` can.

    A conv whose `call` takes `input_scale` and `output_scale` (`WSConv2D`)
    multiplies them into its kernel: the same function with fewer passes over
    the feature maps. Any other conv (e.g. a plain `keras.layers.Conv2D`) gets
    the feature maps multiplied.

    Args:
        conv: a built `keras.layers.Conv2D` (or subclass).
        inputs: the input tensor.
        input_scale: scalar or None. Multiplies the input.
        output_scale: scalar, scalar tensor or None. Multiplies the output.
    """
    if folds_scales(type(conv)):
        return conv(inputs, input_scale=input_scale, output_scale=output_scale)
    if input_scale is not None:
        inputs = inputs * ops.cast(input_scale, inputs.dtype)
    outputs = conv(inputs)
    if output_scale is not None:
        outputs = outputs * ops.cast(output_scale, outputs.dtype)
    return outputs
