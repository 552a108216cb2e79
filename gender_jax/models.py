"""The original Keras gender CNN, ported to Flax linen.

Four Conv -> BatchNorm -> swish -> MaxPool blocks, then Dropout -> Dense 512 ->
BatchNorm -> swish -> [Dropout] -> Dense 1. Initialisers, BatchNorm momentum and
epsilon are the Keras defaults so that a freshly built model matches the
original (9,562,209 parameters at 218x178, 1,664 of them BatchNorm statistics).
The model takes images in the 0..255 range (uint8 or float) and rescales them
itself, like the original's ``Rescaling(1/255)`` layer, and returns one logit
per image: p(male) = sigmoid(logit).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Keras defaults: BatchNormalization(momentum=0.99, epsilon=1e-3),
# Conv2D kernel he_normal (set explicitly in the original), Dense glorot_uniform.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2/2 'valid' max-pool as crop + reshape + max.

  Same result as ``nn.max_pool(x, (2, 2), (2, 2), 'VALID')`` (an odd trailing
  row/column is dropped), but XLA:CPU compiles the reshape form, and above all
  its gradient, far faster than ``reduce_window`` and its select-and-scatter.
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvBlock(nn.Module):
  """Conv (same, no bias, He-normal) -> BatchNorm -> swish -> 2x2 max-pool."""

  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
        self.features,
        (self.kernel_size, self.kernel_size),
        padding='SAME',
        use_bias=False,
        kernel_init=nn.initializers.he_normal(),
        dtype=self.dtype,
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=self.dtype,
    )(x)
    x = nn.swish(x)
    return max_pool_2x2(x)


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
