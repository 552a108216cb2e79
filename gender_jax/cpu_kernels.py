"""XLA:CPU-fast drop-in layers for `models.ConvBlock` (config.kernels='cpu').

`models.py` builds each block from ``nn.Conv`` -> ``nn.BatchNorm`` ->
``nn.swish`` -> ``nn.max_pool``. On CPU the same sums run faster in other
forms, so this module gives the block two replacements with the same
constructor arguments and the same variables (names, shapes, initialisers),
so checkpoints move freely between the two:

- `Conv` for ``nn.Conv``: a first conv with few input channels is computed in
  2x2 space-to-depth form (`conv2d_same_s2d`), which XLA:CPU runs faster, and
  its output is handed on as (N, H/2, W/2, 4, F) blocks; every conv's kernel
  gradient is computed in a form XLA:CPU runs faster than its default one
  (`conv2d`).
- `BatchNormSwishPool` for ``nn.BatchNorm`` *and* the swish and 2x2 max-pool
  after it: one differentiable op (`bn_swish_pool`) whose backward pass works
  at the pooled resolution instead of re-reading full-size activations.

`BLOCK_LAYERS` is what `models.create_model` passes to the model. Every piece
is tested equal to the plain layers (tests/cpu_kernels_test.py); measured
timings are in benchmarks/README.md.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Convs with at most this many input channels (the RGB one) use the 2x2
# space-to-depth form when their input has even height and width.
S2D_MAX_CHANNELS = 4


def _window_parts(x):
  """The 4 members of each 2x2/2 pooling window, as 4 pooled-shape arrays.

  Member k = 2*row + col (row-major). x is either (N, H/2, W/2, 4, C)
  (space-to-depth conv output, member k at axis 3) or (N, H, W, C), with an
  odd last row/column outside every window ('valid' pooling).
  """
  if x.ndim == 5:
    return [x[:, :, :, k, :] for k in range(4)]
  n, h, w, c = x.shape
  x6 = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  return [x6[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]


def _from_window_parts(parts, shape):
  """Inverse of `_window_parts` for an input of `shape`; positions outside
  every window are 0."""
  if len(shape) == 5:
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


def _pooled_activation(y, mean, rstd, scale, bias):
  return functools.reduce(jnp.maximum, [
      _bn_swish(p, mean, rstd, scale, bias) for p in _window_parts(y)])


# How far below a window's pooled value a member's recomputed activation may
# fall and still count as the maximum, relative to 1 + |pooled| (~8 float32
# ulps): enough for a fusion that rounds differently, small enough not to
# turn real near-ties into ties (2**-16 did in the tiny-model gradient test).
_RECOMPUTE_MARGIN = 2.0 ** -20


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bn_swish_pool(y, scale, bias, epsilon: float):
  """Training BatchNorm -> swish -> 2x2/2 max-pool, as one differentiable op.

  Returns (pooled, batch mean, batch variance). Same values as
  ``nn.BatchNorm`` (batch statistics) -> ``nn.swish`` -> ``nn.max_pool``;
  ``y`` is (N, H, W, C) or the (N, H/2, W/2, 4, C) blocks of `Conv` (see
  `_window_parts`). Only each window's maximum gets a gradient, so the op
  saves just the input and the pooled output; the backward pass recomputes
  the four activations of each window from the input, finds the maximum, and
  does the BatchNorm gradient sums over pooled-size arrays. Autodiff of the
  three flax layers instead stores and re-reads full-size activations.

  XLA may round the recomputed activations differently from the forward
  pass (another fusion), so the maximum is the first member within
  `_RECOMPUTE_MARGIN` of the pooled value: exact ties go to the first
  member in row-major order, as in XLA's pooling, and so do near-ties
  closer than the margin. The mean and variance are for the running
  averages; their cotangents are ignored (callers stop their gradient).
  """
  return _bn_swish_pool_fwd(y, scale, bias, epsilon)[0]


def _bn_swish_pool_fwd(y, scale, bias, epsilon):
  mean, var = _batch_stats(y)
  rstd = lax.rsqrt(var + epsilon)
  pooled = _pooled_activation(y, mean, rstd, scale, bias)
  return (pooled, mean, var), (y, pooled, mean, rstd, scale, bias)


def _bn_swish_pool_bwd(epsilon, res, cts):
  del epsilon
  y, pooled, mean, rstd, scale, bias = res
  g = cts[0]
  count = y.size // y.shape[-1]
  axes = tuple(range(g.ndim - 1))
  # The window member holding the maximum, and its input value.
  floor = pooled - _RECOMPUTE_MARGIN * (1 + jnp.abs(pooled))
  parts = _window_parts(y)
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
      [jnp.where(hit, g_max, jnp.zeros((), g.dtype)) for hit in hits], y.shape)
  g_y = (scale * rstd) * (g_z - g_bias / count -
                          (y - mean) * rstd * (g_scale / count))
  return g_y, g_scale, g_bias


bn_swish_pool.defvjp(_bn_swish_pool_fwd, _bn_swish_pool_bwd)


class BatchNormSwishPool(nn.Module):
  """``nn.BatchNorm`` -> ``nn.swish`` -> 2x2/2 'valid' max-pool, in one module.

  Takes ``nn.BatchNorm``'s arguments and creates its variables (params
  scale/bias, batch_stats mean/var), so under the block's 'BatchNorm_0' name
  the variable tree is the plain block's. In training it runs
  `bn_swish_pool`; with running averages, the same activation and pool. The
  input may be `Conv`'s (N, H/2, W/2, 4, C) blocks. Statistics and the output
  are computed in float32, then cast to ``dtype``.
  """

  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, y, use_running_average: Optional[bool] = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    c = y.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    dtype = self.dtype or y.dtype
    y = jnp.asarray(y, jnp.float32)
    if use_running_average:
      pooled = _pooled_activation(y, ra_mean.value,
                                  lax.rsqrt(ra_var.value + self.epsilon),
                                  scale, bias)
    else:
      pooled, mean, var = bn_swish_pool(y, scale, bias, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return jnp.asarray(pooled, dtype)


# Images per slice of the row-tap weight gradient: two images' column-shifted
# inputs stay in the last-level cache.
_WGRAD_CHUNK = 2
# Convs with at least this many input channels get their weight gradient from
# XLA's convolution (`_weight_grad_conv`), the others from matmuls
# (`_weight_grad_rows`): whichever was faster in the 218x178 train step.
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
  into the BatchNorm/swish/pool producers, whose batch-minor writes are slow.
  """
  xt, gt = jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))
  return _lax_conv(xt, gt, padding).transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, kernel, padding):
  """Stride-1 NHWC x HWIO convolution, no bias, explicit ((t, b), (l, r)) pad.

  Forward and input gradient are XLA's convolutions; the kernel gradient is
  computed in a form XLA:CPU runs faster than its default one
  (`_weight_grad_conv` / `_weight_grad_rows`).
  """
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


conv2d.defvjp(_conv_fwd, _conv_bwd)


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
  3-channel 5x5 conv becomes a 12->4F 3x3 conv, which XLA:CPU runs much
  faster, and the 2x2 max-pool that follows is a max over axis 3.
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
  """``nn.Conv(features, (k, k), padding='SAME', use_bias=False)`` on `conv2d`.

  The same parameter ('kernel', HWIO, float32, from ``kernel_init``). An
  input with at most S2D_MAX_CHANNELS channels and even height and width is
  convolved in space-to-depth form and returned as (N, H/2, W/2, 4, F)
  blocks (`conv2d_same_s2d`), for `BatchNormSwishPool`; others as (N, H, W, F).
  """

  features: int
  kernel_size: Sequence[int]
  padding: str = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = nn.linear.default_kernel_init
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    if self.padding != 'SAME' or self.use_bias or kh != kw:
      raise ValueError(
          f'cpu_kernels.Conv supports padding=\'SAME\', use_bias=False and a '
          f'square kernel; got padding={self.padding!r}, '
          f'use_bias={self.use_bias}, kernel_size={self.kernel_size}.')
    _, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (kh, kw, c, self.features),
                        jnp.float32)
    dtype = self.dtype or jnp.result_type(x, jnp.float32)
    x = jnp.asarray(x, dtype)
    kernel = jnp.asarray(kernel, dtype)
    if c <= S2D_MAX_CHANNELS and h % 2 == 0 and w % 2 == 0:
      return conv2d_same_s2d(x, kernel)
    return conv2d_same(x, kernel)


# `models.GenderCNN` arguments that build its blocks from these layers.
BLOCK_LAYERS = dict(conv=Conv, norm=BatchNormSwishPool,
                    norm_applies_swish_pool=True)
