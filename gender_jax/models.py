"""The original Keras gender CNN, ported to Flax linen.

Four Conv -> BatchNorm -> swish -> MaxPool blocks, then Dropout -> Dense 512 ->
BatchNorm -> swish -> [Dropout] -> Dense 1. Initialisers, BatchNorm momentum and
epsilon are the Keras defaults so that a freshly built model matches the
original (9,562,209 parameters at 218x178, 1,664 of them BatchNorm statistics).
The model takes images in the 0..255 range (uint8 or float) and rescales them
itself, like the original's ``Rescaling(1/255)`` layer, and returns one logit
per image: p(male) = sigmoid(logit).

The blocks' conv and BatchNorm layers are arguments of the model (as in flax's
ImageNet ResNet). `create_model` passes flax's own layers, or on the CPU
backend the faster drop-ins of `gender_jax.cpu_kernels`, which have the same
variables: config.kernels ('auto', 'plain' or 'cpu') chooses.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gender_jax import cpu_kernels

ModuleDef = Any

# Keras defaults: BatchNormalization(momentum=0.99, epsilon=1e-3),
# Conv2D kernel he_normal (set explicitly in the original), Dense glorot_uniform.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
KERNELS = ('auto', 'plain', 'cpu')
MODELS = ('cnn', 'tiny')             # config.model: the original, a small one.
COMPUTE_DTYPES = ('float32', 'bfloat16')


class ConvBlock(nn.Module):
  """Conv (same, no bias, He-normal) -> BatchNorm -> swish -> 2x2/2 max-pool.

  ``conv`` and ``norm`` are built with ``nn.Conv`` and ``nn.BatchNorm``
  arguments and named Conv_0 and BatchNorm_0 whatever their class, so every
  choice of layers has the same variable tree. ``norm_applies_swish_pool``:
  ``norm`` also applies the swish and the pool (`cpu_kernels.BatchNormSwishPool`).
  """

  features: int
  kernel_size: int
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  norm_applies_swish_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(self.features, (self.kernel_size, self.kernel_size),
                  padding='SAME', use_bias=False,
                  kernel_init=nn.initializers.he_normal(), dtype=self.dtype,
                  name='Conv_0')(x)
    x = self.norm(use_running_average=not train, momentum=BN_MOMENTUM,
                  epsilon=BN_EPSILON, dtype=self.dtype, name='BatchNorm_0')(x)
    if self.norm_applies_swish_pool:
      return x
    x = nn.swish(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


class GenderCNN(nn.Module):
  """The original classifier; ``dropout_rate`` is the stage-2 output dropout.

  Attributes:
    filters: conv widths of the four blocks.
    kernel_sizes: conv kernel sizes of the four blocks.
    hidden_units: width of the dense layer.
    flatten_dropout_rate: dropout after flattening (0.3 in both stages).
    dropout_rate: dropout before the output layer (0 in stage 1, 0.3 in stage 2).
    dtype: computation dtype (parameters stay float32).
    conv, norm, norm_applies_swish_pool: the blocks' layers (see `ConvBlock`).
  """

  filters: Sequence[int] = (32, 64, 96, 128)
  kernel_sizes: Sequence[int] = (5, 3, 3, 3)
  hidden_units: int = 512
  flatten_dropout_rate: float = 0.3
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  norm_applies_swish_pool: bool = False

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
      x = ConvBlock(features, kernel, conv=self.conv, norm=self.norm,
                    norm_applies_swish_pool=self.norm_applies_swish_pool,
                    dtype=self.dtype)(x, train)
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


def resolve_kernels(kernels: str) -> str:
  """'plain' or 'cpu' for config.kernels; 'auto' is 'cpu' on the CPU backend.

  GPU and TPU compile flax's layers: the CPU kernels' forms are chosen for
  XLA:CPU only.
  """
  if kernels not in KERNELS:
    raise ValueError(f'config.kernels={kernels!r}: expected one of {KERNELS}.')
  if kernels == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'plain'
  return kernels


def create_model(config) -> GenderCNN:
  """Builds the model named by ``config.model`` ('cnn' or 'tiny') with the
  block layers of ``config.kernels`` (absent in old workdirs: 'auto')."""
  dtype = jnp.bfloat16 if config.get('compute_dtype', 'float32') == 'bfloat16' else jnp.float32
  common = dict(
      flatten_dropout_rate=config.flatten_dropout_rate,
      dropout_rate=config.dropout_rate,
      dtype=dtype,
  )
  if resolve_kernels(config.get('kernels', 'auto')) == 'cpu':
    common.update(cpu_kernels.BLOCK_LAYERS)
  if config.model == 'cnn':
    return GenderCNN(**common)
  if config.model == 'tiny':
    return GenderCNN(filters=(4, 8, 8, 8), kernel_sizes=(5, 3, 3, 3),
                     hidden_units=16, **common)
  raise ValueError(f'config.model={config.model!r}: expected one of {MODELS}.')


def init_variables(model: nn.Module, rng, image_size):
  """Initialises {'params', 'batch_stats'} for (H, W) inputs."""
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
  return model.init({'params': rng}, dummy, train=False)
