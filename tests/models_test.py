"""Tests of gender_jax.models: the plain Flax architecture (sizes, modes) and
the choice of block layers (config.kernels)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gender_jax import cpu_kernels
from gender_jax import models


def _config(model='tiny', kernels='plain', **kw):
  c = ml_collections.ConfigDict(dict(
      model=model, flatten_dropout_rate=0.3, dropout_rate=0.0,
      compute_dtype='float32', kernels=kernels))
  c.update(kw)
  return c


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count_of_the_original():
  model = models.create_model(_config('cnn'))
  shapes = jax.eval_shape(
      functools.partial(models.init_variables, model, image_size=(218, 178)),
      jax.random.key(0))
  assert _count(shapes) == 9_562_209
  assert _count(shapes['batch_stats']) == 1_664


def test_output_shape_and_dtype():
  model = models.create_model(_config())
  variables = models.init_variables(model, jax.random.key(0), (20, 16))
  images = np.zeros((3, 20, 16, 3), np.uint8)
  logits = model.apply(variables, images)
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  bf16 = models.create_model(_config(compute_dtype='bfloat16'))
  logits = bf16.apply(variables, images)
  assert logits.shape == (3,) and logits.dtype == jnp.float32


def test_batch_stats_change_in_train_mode_only():
  model = models.create_model(_config())
  variables = models.init_variables(model, jax.random.key(0), (20, 16))
  images = np.random.default_rng(0).integers(0, 256, (4, 20, 16, 3))
  _, eval_updates = model.apply(variables, images, train=False,
                                mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(eval_updates['batch_stats']),
                  jax.tree.leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(a, b)
  _, train_updates = model.apply(variables, images, train=True,
                                 rngs={'dropout': jax.random.key(1)},
                                 mutable=['batch_stats'])
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(train_updates['batch_stats']),
      jax.tree.leaves(variables['batch_stats']))]
  assert all(changed)


def test_dropout_only_with_train_or_mc_dropout_and_rng():
  model = models.create_model(_config(flatten_dropout_rate=0.5,
                                      dropout_rate=0.5))
  variables = models.init_variables(model, jax.random.key(0), (20, 16))
  images = np.random.default_rng(0).integers(0, 256, (4, 20, 16, 3))
  a = model.apply(variables, images)
  np.testing.assert_array_equal(a, model.apply(variables, images))
  def train(seed):
    return model.apply(variables, images, train=True,
                       rngs={'dropout': jax.random.key(seed)},
                       mutable=['batch_stats'])[0]
  assert not np.allclose(train(1), train(2))
  with pytest.raises(Exception):
    model.apply(variables, images, train=True, mutable=['batch_stats'])
  # MC-Dropout: dropout on, BatchNorm on running averages (nothing mutable).
  def mc(seed):
    return model.apply(variables, images, mc_dropout=True,
                       rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(mc(1), mc(1))
  assert not np.allclose(mc(1), mc(2))


def test_the_block_is_flax_conv_batchnorm_swish_pool():
  """One plain block, against the four flax layers written out."""
  block = models.ConvBlock(6, 3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 9, 4)),
                  jnp.float32)
  variables = block.init(jax.random.key(0), x, train=False)
  conv = nn.Conv(6, (3, 3), padding='SAME', use_bias=False)
  norm = nn.BatchNorm(use_running_average=True, momentum=models.BN_MOMENTUM,
                      epsilon=models.BN_EPSILON)
  y = conv.apply({'params': variables['params']['Conv_0']}, x)
  y = norm.apply({'params': variables['params']['BatchNorm_0'],
                  'batch_stats': variables['batch_stats']['BatchNorm_0']}, y)
  expected = nn.max_pool(nn.swish(y), (2, 2), (2, 2), 'VALID')
  out = block.apply(variables, x, train=False)
  assert out.shape == (2, 3, 4, 6)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  # He-normal kernel: std sqrt(2 / fan_in) (truncated normal).
  kernel = models.init_variables(models.create_model(_config('cnn')),
                                 jax.random.key(0), (32, 32))['params'][
                                     'ConvBlock_1']['Conv_0']['kernel']
  assert abs(float(jnp.std(kernel)) / np.sqrt(2 / (3 * 3 * 32)) - 1) < 0.05


def _train_jaxprs(config, image_size=(20, 16)):
  """jaxpr texts of a train-mode apply and of its value_and_grad."""
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0), image_size)
  images = jnp.zeros((2, *image_size, 3), jnp.float32)

  def loss(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, images,
        train=True, rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'])
    return jnp.sum(logits), updates

  return (str(jax.make_jaxpr(loss)(variables['params'])),
          str(jax.make_jaxpr(jax.value_and_grad(loss, has_aux=True))(
              variables['params'])))


def test_plain_kernels_train_step_has_no_custom_vjp():
  forward, step = _train_jaxprs(_config(kernels='plain'))
  assert 'custom_vjp' not in forward and 'custom_vjp' not in step
  # Differentiation inlines a custom VJP's rules, so the check that can see
  # one is on the differentiated function: the CPU kernels' has them.
  assert 'custom_vjp' in _train_jaxprs(_config(kernels='cpu'))[0]


@pytest.mark.parametrize('backend,expected', [('cpu', 'cpu'), ('gpu', 'plain'),
                                              ('tpu', 'plain')])
def test_auto_kernels_are_cpu_kernels_on_cpu_only(monkeypatch, backend,
                                                  expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert models.resolve_kernels('auto') == expected
  model = models.create_model(_config(kernels='auto'))
  if expected == 'cpu':
    assert (model.conv, model.norm) == (cpu_kernels.Conv,
                                        cpu_kernels.BatchNormSwishPool)
    assert model.norm_applies_swish_pool
  else:
    assert (model.conv, model.norm) == (nn.Conv, nn.BatchNorm)
    assert not model.norm_applies_swish_pool
  # Explicit choices hold on every backend; a config without the field
  # (an old workdir's) means 'auto'.
  assert models.create_model(_config(kernels='plain')).conv is nn.Conv
  assert models.create_model(_config(kernels='cpu')).conv is cpu_kernels.Conv
  old = _config()
  del old['kernels']
  assert models.create_model(old).conv is model.conv


def test_unknown_kernels_fail_with_the_choices():
  with pytest.raises(ValueError, match="config.kernels='gpu'.*'auto', 'plain', 'cpu'"):
    models.create_model(_config(kernels='gpu'))
