"""The original Keras gender CNN, ported to Flax linen.

Four Conv -> BatchNorm -> swish -> MaxPool blocks, then Dropout -> Dense 512 ->
BatchNorm -> swish -> [Dropout] -> Dense 1. Initialisers, BatchNorm momentum and
epsilon are the Keras defaults so that a freshly built model matches the
original (9,562,209 parameters at 218x178, 1,664 of them BatchNorm statistics).
The model takes images in the 0..255 range (uint8 or float) and rescales them
itself, like the original's ``Rescaling(1/255)`` layer, and returns one logit
per image: p(male) = sigmoid(logit).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Keras defaults: BatchNormalization(momentum=0.99, epsilon=1e-3),
# Conv2D kernel he_normal (set explicitly in the original), Dense glorot_uniform.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
# Convs with at most this many input channels (the RGB one) use the 2x2
# space-to-depth form when their input has even height and width.
S2D_MAX_CHANNELS = 4


def _window_parts(x, blocks: bool):
  """The 4 members of each 2x2/2 pooling window, as 4 pooled-shape arrays.

  Member k = 2*row + col (row-major). ``blocks``: x is (N, H/2, W/2, 4, C)
  (space-to-depth conv output, member k at axis 3); else (N, H, W, C), with
  an odd last row/column outside every window ('valid' pooling).
  """
  if blocks:
    return [x[:, :, :, k, :] for k in range(4)]
  n, h, w, c = x.shape
  x6 = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  return [x6[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]


def _from_window_parts(parts, shape, blocks: bool):
  """Inverse of `_window_parts`; positions outside every window are 0."""
  if blocks:
    return jnp.stack(parts, axis=3)
  n, h, w, c = shape
  h2, w2 = h // 2, w // 2
  x = jnp.stack(parts, axis=3).reshape(n, h2, w2, 2, 2, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h2, 2 * w2, c)
  return jnp.pad(x, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))


def _batch_stats(y):
  """Per-channel mean and biased variance over all other axes (flax's fast
  variance: E[y^2] - E[y]^2, clipped at 0)."""
  axes = tuple(range(y.ndim - 1))
  mean = jnp.mean(y, axes)
  return mean, jnp.maximum(0.0, jnp.mean(y * y, axes) - mean * mean)


def _bn_swish(y, mean, rstd, scale, bias):
  return nn.swish((y - mean) * (rstd * scale) + bias)


def _pooled_activation(y, mean, rstd, scale, bias, blocks):
  return functools.reduce(jnp.maximum, [
      _bn_swish(p, mean, rstd, scale, bias) for p in _window_parts(y, blocks)])


# How far below a window's pooled value a member's recomputed activation may
# fall and still count as the maximum, relative to 1 + |pooled| (~8 float32
# ulps). Recomputation matched bit for bit in the 218x178 train step; the
# margin covers a fusion that rounds differently. Larger margins turn real
# near-ties into ties (2**-16 already did in the tiny-model gradient test).
_RECOMPUTE_MARGIN = 2.0 ** -20


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_swish_pool(y, scale, bias, epsilon: float, blocks: bool):
  """Training BatchNorm -> swish -> 2x2/2 max-pool, as one differentiable op.

  Returns (pooled, batch mean, batch variance). Same values as
  ``nn.BatchNorm`` (batch statistics) -> ``nn.swish`` -> ``nn.max_pool``,
  see `_window_parts` for the layouts. Only each window's maximum gets a
  gradient, so the op saves just the input and the pooled output; the
  backward pass recomputes the four activations of each window from the
  input, finds the maximum, and does the BatchNorm gradient sums over
  pooled-size arrays. Autodiff of the three flax layers instead stores and
  re-reads full-size activations. Measured on the 218x178 train step at
  batch 32 (~470 ms): a first version that stored each window's maximum
  saved 14 ms over the flax layers, and this recomputation 20-32 ms more.

  XLA may round the recomputed activations differently from the forward
  pass (another fusion), so the maximum is the first member within
  `_RECOMPUTE_MARGIN` of the pooled value: exact ties go to the first
  member in row-major order, as in XLA's pooling, and so do near-ties
  closer than the margin. The mean and variance are for the running
  averages; their cotangents are ignored (callers stop their gradient).
  """
  return _bn_swish_pool_fwd(y, scale, bias, epsilon, blocks)[0]


def _bn_swish_pool_fwd(y, scale, bias, epsilon, blocks):
  mean, var = _batch_stats(y)
  rstd = lax.rsqrt(var + epsilon)
  pooled = _pooled_activation(y, mean, rstd, scale, bias, blocks)
  return (pooled, mean, var), (y, pooled, mean, rstd, scale, bias)


def _bn_swish_pool_bwd(epsilon, blocks, res, cts):
  del epsilon
  y, pooled, mean, rstd, scale, bias = res
  g = cts[0]
  count = y.size // y.shape[-1]
  axes = tuple(range(g.ndim - 1))
  # The window member holding the maximum, and its input value.
  floor = pooled - _RECOMPUTE_MARGIN * (1 + jnp.abs(pooled))
  parts = _window_parts(y, blocks)
  hits, taken, y_max = [], None, jnp.zeros_like(pooled)
  for part in parts:
    hit = _bn_swish(part, mean, rstd, scale, bias) >= floor
    if taken is not None:
      hit &= ~taken
    hits.append(hit)
    y_max = jnp.where(hit, part, y_max)
    taken = hit if taken is None else taken | hit
  # d(loss)/d(BatchNorm output) at each window's maximum (zero elsewhere).
  xhat_max = (y_max - mean) * rstd
  z = xhat_max * scale + bias
  s = jax.nn.sigmoid(z)
  g_max = g * (s * (1 + z * (1 - s)))
  g_bias = jnp.sum(g_max, axes)
  g_scale = jnp.sum(g_max * xhat_max, axes)
  g_z = _from_window_parts(
      [jnp.where(hit, g_max, jnp.zeros((), g.dtype)) for hit in hits],
      y.shape, blocks)
  g_y = (scale * rstd) * (g_z - g_bias / count -
                          (y - mean) * rstd * (g_scale / count))
  return g_y, g_scale, g_bias


bn_swish_pool.defvjp(_bn_swish_pool_fwd, _bn_swish_pool_bwd)


class BatchNormSwishPool(nn.Module):
  """``nn.BatchNorm`` -> ``nn.swish`` -> 2x2/2 'valid' max-pool.

  The same variables as ``nn.BatchNorm`` (params scale/bias, batch_stats
  mean/var, Keras momentum and epsilon), so checkpoints and the parameter
  count are those of the plain layers; in training it runs `bn_swish_pool`.
  ``blocks``: the input is the (N, H/2, W/2, 4, C) space-to-depth layout.
  Statistics and the output are computed in float32, then cast to ``dtype``.
  """

  blocks: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y, train: bool):
    c = y.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if train:
      pooled, mean, var = bn_swish_pool(y, scale, bias, self.epsilon,
                                        self.blocks)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    else:
      pooled = _pooled_activation(y, ra_mean.value,
                                  lax.rsqrt(ra_var.value + self.epsilon),
                                  scale, bias, self.blocks)
    return jnp.asarray(pooled, self.dtype)


# Images per slice of the row-tap weight gradient: two images' column-shifted
# inputs stay in the last-level cache (measured best of 1, 2, 4, 8, 32).
_WGRAD_CHUNK = 2
# Convs with at least this many input channels get their CPU weight gradient
# from XLA's convolution (`_weight_grad_conv`), the others from matmuls
# (`_weight_grad_rows`): measured on the train step at 218x178, batch 32.
_WGRAD_CONV_MIN_CHANNELS = 32


def _same_padding(kernel_size: int):
  return ((kernel_size - 1) // 2, kernel_size // 2)


def _lax_conv(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _column_shifts(x, kw, padding, width):
  """(N, H, W, C) -> padded (N, H + pad, width, kw*C): the kw column taps."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  return jnp.concatenate([x[:, :, j:j + width, :] for j in range(kw)], axis=-1)


def _chunk_size(n: int, target: int) -> int:
  return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _weight_grad_rows(x, g, kernel_shape, padding):
  """d(loss)/d(kernel), one kernel row at a time, over chunks of images.

  Kernel row i is (row-shifted column taps)^T @ grads, a (kw*C, F) matmul:
  the column taps are built once per chunk (kw copies of the input, not the
  kh*kw of full patches) and each row reads them at an offset.
  """
  kh, kw, cin, cout = kernel_shape
  n, h, w, _ = g.shape
  b = _chunk_size(n, _WGRAD_CHUNK)
  xs = x.reshape(n // b, b, *x.shape[1:])
  gs = g.reshape(n // b, b, *g.shape[1:])
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

  def body(acc, xg):
    xc, gc = xg
    q = _column_shifts(xc, kw, padding, w)
    gc = gc.reshape(-1, cout)
    rows = [lax.dot_general(q[:, i:i + h].reshape(-1, kw * cin), gc,
                            (((0,), (0,)), ((), ())),
                            preferred_element_type=acc_dtype)
            for i in range(kh)]
    return acc + jnp.stack(rows), None

  acc, _ = lax.scan(body, jnp.zeros((kh, kw * cin, cout), acc_dtype),
                    (xs, gs))
  return acc.reshape(kernel_shape).astype(x.dtype)


def _weight_grad_conv(x, g, padding):
  """d(loss)/d(kernel) as XLA's convolution of (C, H, W, N) x by (H, W, N, F) g.

  The same convolution XLA's autodiff emits, but on operands transposed from
  the stored activations: in the autodiff form XLA fuses those transposes
  into the BatchNorm/swish/pool producers, whose batch-minor writes made one
  of them ~210 ms of traced time in the train step.
  """
  xt, gt = jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))
  return _lax_conv(xt, gt, padding).transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_cpu(x, kernel, padding):
  return _lax_conv(x, kernel, padding)


def _conv_fwd(x, kernel, padding):
  return _lax_conv(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, padding), x)
  if kernel.shape[2] >= _WGRAD_CONV_MIN_CHANNELS:
    g_kernel = _weight_grad_conv(x, g, padding)
  else:
    g_kernel = _weight_grad_rows(x, g, kernel.shape, padding)
  return vjp_x(g)[0], g_kernel


_conv2d_cpu.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, padding):
  """Stride-1 NHWC x HWIO convolution, no bias, explicit ((t, b), (l, r)) pad.

  Forward and input gradient are XLA's convolutions. On CPU the kernel
  gradient is computed in a form XLA:CPU runs faster than its default one
  (`_weight_grad_conv` / `_weight_grad_rows`); other backends use plain
  autodiff.
  """
  if jax.default_backend() == 'cpu':
    return _conv2d_cpu(x, kernel, padding)
  return _lax_conv(x, kernel, padding)


def conv2d_same(x, kernel):
  """'same' stride-1 convolution (= nn.Conv(padding='SAME', use_bias=False))."""
  return conv2d(x, kernel, tuple(_same_padding(k) for k in kernel.shape[:2]))


def _s2d_taps(kernel_size: int):
  """Index tables mapping a kxk kernel onto its 2x2 space-to-depth form.

  Output pixel (2a+po, 2b+qo) reads input pixel (2(a+u)+pi, 2(b+v)+qi), i.e.
  tap (2u+pi-po+r, 2v+qi-qo+r) of the kernel (r = k//2) when inside it.
  Returns (tap_rows, tap_cols, valid, block padding), tables of shape
  (U, U, 2, 2, 2, 2) over (u, v, pi, qi, po, qo).
  """
  r = kernel_size // 2
  lo, hi = (-r) // 2, (1 + r) // 2
  u = np.arange(lo, hi + 1)
  uu, vv, pi, qi, po, qo = np.meshgrid(u, u, [0, 1], [0, 1], [0, 1], [0, 1],
                                       indexing='ij')
  rows = 2 * uu + pi - po + r
  cols = 2 * vv + qi - qo + r
  valid = (rows >= 0) & (rows < kernel_size) & (cols >= 0) & (cols < kernel_size)
  return (np.clip(rows, 0, kernel_size - 1), np.clip(cols, 0, kernel_size - 1),
          valid, ((-lo, hi), (-lo, hi)))


def conv2d_same_s2d(x, kernel):
  """'same' conv of even-sized x, returned as (N, H/2, W/2, 4, F) 2x2 blocks.

  Same sums as `conv2d_same` (the output pixel (2a+po, 2b+qo) is
  [:, a, b, 2*po+qo]), computed as a 2x2 space-to-depth convolution: a
  3-channel 5x5 conv becomes a 12->4F 3x3 conv, which runs several times
  faster on CPU, and the 2x2 max-pool that follows is a max over axis 3.
  """
  n, h, w, c = x.shape
  k, f = kernel.shape[0], kernel.shape[-1]
  rows, cols, valid, padding = _s2d_taps(k)
  xs = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(n, h // 2, w // 2, 4 * c)
  ks = kernel[rows, cols] * jnp.asarray(valid, kernel.dtype)[..., None, None]
  u = rows.shape[0]
  # (u, v, pi, qi, po, qo, c, f) -> (u, v, (pi, qi, c), (po, qo, f)).
  ks = ks.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(u, u, 4 * c, 4 * f)
  y = conv2d(xs, ks, padding)
  return y.reshape(n, h // 2, w // 2, 4, f)


class Conv(nn.Module):
  """``nn.Conv(features, (k, k), padding='SAME', use_bias=False)`` on
  `conv2d_same`: same parameter ('kernel', HWIO, He-normal), faster grads.

  With ``blocks=True`` (even H and W) it returns the output as 2x2 blocks,
  (N, H/2, W/2, 4, F), via `conv2d_same_s2d`.
  """

  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, blocks: bool = False):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    return conv2d_same_s2d(x, kernel) if blocks else conv2d_same(x, kernel)


class ConvBlock(nn.Module):
  """Conv (same, no bias, He-normal) -> BatchNorm -> swish -> 2x2 max-pool.

  A block with few input channels and an even-sized input (the first one)
  computes its conv in 2x2 space-to-depth form (`conv2d_same_s2d`); BatchNorm
  statistics then run over the (N, H/2, W/2, 4, F) blocks, which hold the same
  values, and the max-pool is a max over the 4 pixels of each block. The
  BatchNorm, swish and pool are one op (`BatchNormSwishPool`) whose gradient
  is computed at the pooled resolution.
  """

  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    _, h, w, c = x.shape
    blocks = c <= S2D_MAX_CHANNELS and h % 2 == 0 and w % 2 == 0
    x = Conv(self.features, self.kernel_size, dtype=self.dtype,
             name='Conv_0')(x, blocks=blocks)
    return BatchNormSwishPool(blocks=blocks, dtype=self.dtype,
                              name='BatchNorm_0')(x, train)


class GenderCNN(nn.Module):
  """The original classifier; ``dropout_rate`` is the stage-2 output dropout.

  Attributes:
    filters: conv widths of the four blocks.
    kernel_sizes: conv kernel sizes of the four blocks.
    hidden_units: width of the dense layer.
    flatten_dropout_rate: dropout after flattening (0.3 in both stages).
    dropout_rate: dropout before the output layer (0 in stage 1, 0.3 in stage 2).
    dtype: computation dtype (parameters stay float32).
  """

  filters: Sequence[int] = (32, 64, 96, 128)
  kernel_sizes: Sequence[int] = (5, 3, 3, 3)
  hidden_units: int = 512
  flatten_dropout_rate: float = 0.3
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, mc_dropout: bool = False):
    """Maps (N, H, W, 3) images in 0..255 to (N,) logits.

    Dropout is active when ``train`` or ``mc_dropout`` is true (a 'dropout' rng
    is then needed); BatchNorm uses batch statistics (and updates
    ``batch_stats``) only in train. ``mc_dropout`` alone is MC-Dropout
    inference: dropout on, BatchNorm on its running averages.
    """
    stochastic = train or mc_dropout
    x = jnp.asarray(images, self.dtype) * (1.0 / 255.0)
    for features, kernel in zip(self.filters, self.kernel_sizes):
      x = ConvBlock(features, kernel, dtype=self.dtype)(x, train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.flatten_dropout_rate, deterministic=not stochastic)(x)
    x = nn.Dense(self.hidden_units, use_bias=False,
                 kernel_init=nn.initializers.glorot_uniform(),
                 dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=self.dtype)(x)
    x = nn.swish(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not stochastic)(x)
    x = nn.Dense(1, kernel_init=nn.initializers.glorot_uniform(),
                 bias_init=nn.initializers.zeros, dtype=self.dtype)(x)
    return jnp.asarray(x[:, 0], jnp.float32)


def create_model(config) -> GenderCNN:
  """Builds the model named by ``config.model`` ('cnn' or 'tiny')."""
  dtype = jnp.bfloat16 if config.get('compute_dtype', 'float32') == 'bfloat16' else jnp.float32
  common = dict(
      flatten_dropout_rate=config.flatten_dropout_rate,
      dropout_rate=config.dropout_rate,
      dtype=dtype,
  )
  if config.model == 'cnn':
    return GenderCNN(**common)
  if config.model == 'tiny':
    return GenderCNN(filters=(4, 8, 8, 8), kernel_sizes=(5, 3, 3, 3),
                     hidden_units=16, **common)
  raise ValueError(f"config.model={config.model!r}: expected 'cnn' or 'tiny'.")


def init_variables(model: nn.Module, rng, image_size):
  """Initialises {'params', 'batch_stats'} for (H, W) inputs."""
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
  return model.init({'params': rng}, dummy, train=False)
