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


def _first_max(parts):
  """Max of 4 same-shaped arrays and the index (0..3) of the first maximum.

  The index is computed from pairwise comparisons only (never `part == max`),
  so it stays consistent even when XLA recomputes `parts` in another fusion.
  """
  a, b, c, d = parts
  m_ab, m_cd = jnp.maximum(a, b), jnp.maximum(c, d)
  i_ab = jnp.where(b > a, 1, 0).astype(jnp.int8)
  i_cd = jnp.where(d > c, 3, 2).astype(jnp.int8)
  return jnp.maximum(m_ab, m_cd), jnp.where(m_cd > m_ab, i_cd, i_ab)


@jax.custom_vjp
def _pool_even(x):
  return _pool_even_fwd(x)[0]


def _pool_even_fwd(x):
  n, h, w, c = x.shape
  x6 = x.reshape(n, h // 2, 2, w // 2, 2, c)
  y, idx = _first_max([x6[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)])
  return y, idx


def _pool_even_bwd(idx, g):
  n, h2, w2, c = g.shape
  pos = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)
  dx = jnp.where(idx[:, :, None, :, None, :] == pos, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype))
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2/2 'valid' max-pool: crop + reshape + max, with a saved-argmax VJP.

  Same values and gradients as ``nn.max_pool(x, (2, 2), (2, 2), 'VALID')``
  (an odd trailing row/column is dropped; on ties the first maximum in
  row-major order gets the gradient), but XLA:CPU compiles it, and above all
  its gradient, far faster than ``reduce_window`` and select-and-scatter.
  The argmax is saved in the forward pass: the plain reshape-max gradient
  (``x == max`` masks) is wrong under jit on CPU, because XLA recomputes ``x``
  in another fusion with different rounding and the mask comes out empty.
  """
  _, h, w, _ = x.shape
  return _pool_even(x[:, : h // 2 * 2, : w // 2 * 2, :])


@jax.custom_vjp
def max_pool_blocks(x: jnp.ndarray) -> jnp.ndarray:
  """Max over axis 3 (size 4) of (N, H, W, 4, C) blocks; saved-argmax VJP."""
  return _pool_blocks_fwd(x)[0]


def _pool_blocks_fwd(x):
  return _first_max([x[:, :, :, i, :] for i in range(4)])


def _pool_blocks_bwd(idx, g):
  pos = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 1, 4, 1)
  return (jnp.where(idx[:, :, :, None, :] == pos, g[:, :, :, None, :],
                    jnp.zeros((), g.dtype)),)


max_pool_blocks.defvjp(_pool_blocks_fwd, _pool_blocks_bwd)


# Images per slice when the weight gradient is computed as patches^T @ grads:
# a few images' patches stay in the last-level cache.
_WGRAD_CHUNK = 4


def _same_padding(kernel_size: int):
  return ((kernel_size - 1) // 2, kernel_size // 2)


def _lax_conv(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches(x, kernel_hw, padding):
  """(N, H, W, C) -> (N, H, W, kh*kw*C) stride-1 patches, HWIO tap order."""
  kh, kw = kernel_hw
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  h = x.shape[1] - kh + 1
  w = x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i:i + h, j:j + w, :]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _chunk_size(n: int, target: int) -> int:
  return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _weight_grad(x, g, kernel_shape, padding):
  """d(loss)/d(kernel) as sum over image chunks of patches^T @ grads.

  XLA:CPU computes the transposed convolution for a filter gradient with
  batch and features swapped, several times slower than a matmul; chunking
  over images keeps each patch matrix in cache.
  """
  kh, kw, cin, cout = kernel_shape
  n = x.shape[0]
  b = _chunk_size(n, _WGRAD_CHUNK)
  xs = x.reshape(n // b, b, *x.shape[1:])
  gs = g.reshape(n // b, b, *g.shape[1:])

  def body(acc, xg):
    xc, gc = xg
    p = _patches(xc, (kh, kw), padding).reshape(-1, kh * kw * cin)
    return acc + lax.dot_general(p, gc.reshape(-1, cout),
                                 (((0,), (0,)), ((), ())),
                                 preferred_element_type=acc_dtype), None

  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  acc, _ = lax.scan(body, jnp.zeros((kh * kw * cin, cout), acc_dtype),
                    (xs, gs))
  return acc.reshape(kernel_shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, kernel, padding):
  """Stride-1 NHWC x HWIO convolution, no bias, explicit ((t, b), (l, r)) pad.

  Forward and input gradient are XLA's convolutions; the kernel gradient is
  `_weight_grad` (several times faster on CPU than XLA's).
  """
  return _lax_conv(x, kernel, padding)


def _conv_fwd(x, kernel, padding):
  return _lax_conv(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, padding), x)
  return vjp_x(g)[0], _weight_grad(x, g, kernel.shape, padding)


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
  values, and the max-pool is a max over the 4 pixels of each block.
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
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=self.dtype,
        name='BatchNorm_0',
    )(x)
    x = nn.swish(x)
    return max_pool_blocks(x) if blocks else max_pool_2x2(x)


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
