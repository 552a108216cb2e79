"""Tests of gender_jax.cpu_kernels: each CPU kernel equals the plain Flax
layers of models.py (values, gradients, running statistics), and checkpoints
move between the two."""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gender_jax import cpu_kernels
from gender_jax import models


def _config(kernels, model='tiny'):
  return ml_collections.ConfigDict(dict(
      model=model, flatten_dropout_rate=0.3, dropout_rate=0.0,
      compute_dtype='float32', kernels=kernels))


def _plain_bn_swish_pool(x, scale, bias):
  """nn.BatchNorm (batch statistics) -> nn.swish -> nn.max_pool, as a reference."""
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)
  y, updates = bn.apply(
      {'params': {'scale': scale, 'bias': bias},
       'batch_stats': {'mean': jnp.zeros_like(scale),
                       'var': jnp.ones_like(scale)}},
      x, mutable=['batch_stats'])
  pooled = nn.max_pool(nn.swish(y), (2, 2), (2, 2), 'VALID')
  return pooled, updates['batch_stats']


def _to_blocks(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, h // 2, w // 2, 4, c)


@pytest.mark.parametrize('shape,blocks', [((2, 8, 6, 3), False),
                                          ((2, 7, 9, 4), False),
                                          ((1, 5, 5, 2), False),
                                          ((2, 8, 6, 3), True)])
def test_bn_swish_pool_matches_plain_layers_with_gradients(shape, blocks):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.uniform(-2, 2, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  r = jnp.asarray(rng.standard_normal(
      (shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)
  layout = _to_blocks if blocks else lambda v: v

  def loss(x, scale, bias):
    out, mean, var = cpu_kernels.bn_swish_pool(layout(x), scale, bias, 1e-3)
    return jnp.sum(out * r), (out, mean, var)

  def loss_ref(x, scale, bias):
    out, stats = _plain_bn_swish_pool(x, scale, bias)
    return jnp.sum(out * r), (out, stats)

  g, (out, mean, var) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(
      x, scale, bias)
  g_ref, (out_ref, stats) = jax.jit(jax.grad(loss_ref, (0, 1, 2),
                                             has_aux=True))(x, scale, bias)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
  # Running averages after one step: 0.99 * init + 0.01 * batch statistic.
  np.testing.assert_allclose(0.01 * mean, stats['mean'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(0.99 + 0.01 * var, stats['var'], rtol=1e-6)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bn_swish_pool_ties_go_to_the_first_maximum():
  """Equal inputs in a window: the gradient goes to the first, like XLA's pool."""
  x = jnp.asarray(np.repeat([[[[0.5]]], [[[-0.5]]]], 2, axis=1).repeat(2, 2),
                  jnp.float32)                      # (2, 2, 2, 1), windows of ties
  ones = jnp.ones((1,))

  def grad(fn):
    return jax.grad(lambda x: jnp.sum(fn(x) * jnp.asarray([[[[1.]]], [[[2.]]]])))(x)

  g = grad(lambda x: cpu_kernels.bn_swish_pool(x, ones, ones, 1e-3)[0])
  g_ref = grad(lambda x: _plain_bn_swish_pool(x, ones, ones)[0])
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
  assert np.count_nonzero(g[0, :, :, 0] - g[0, 1, 1, 0]) == 1   # only [0, 0] differs


def test_bn_swish_pool_gradient_survives_recomputation_rounding():
  """The backward pass recomputes the activations, maybe in another XLA fusion
  that rounds differently: a pooled value a few ulps off must not move the
  gradient (the first plain reshape-max pool lost it that way)."""
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.standard_normal((2, 6, 4, 3)) * 2, jnp.float32)
  scale = jnp.asarray([1.5, -0.7, 0.3], jnp.float32)
  bias = jnp.asarray([0.1, 0.2, -0.3], jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 3, 2, 3)), jnp.float32)
  _, res = cpu_kernels._bn_swish_pool_fwd(y, scale, bias, 1e-3)
  exact = cpu_kernels._bn_swish_pool_bwd(1e-3, res, (g, None, None))
  pooled = res[1]
  for ulps in (3, -3):
    off = pooled
    for _ in range(abs(ulps)):
      off = jnp.nextafter(off, jnp.inf if ulps > 0 else -jnp.inf)
    grads = cpu_kernels._bn_swish_pool_bwd(1e-3, (res[0], off, *res[2:]),
                                           (g, None, None))
    for a, b in zip(grads, exact):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_norm_swish_pool_eval_uses_running_averages():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 4, 3)), jnp.float32)
  module = cpu_kernels.BatchNormSwishPool(use_running_average=True,
                                          epsilon=1e-3)
  variables = module.init(jax.random.key(0), x)
  variables = jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 2, v.shape), jnp.float32), variables)
  ref = nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-3)
  expected = nn.max_pool(nn.swish(ref.apply(variables, x)), (2, 2), (2, 2), 'VALID')
  np.testing.assert_allclose(module.apply(variables, x), expected,
                             rtol=1e-6, atol=1e-6)
  blocked = module.apply(variables, _to_blocks(x))
  np.testing.assert_allclose(blocked, expected, rtol=1e-6, atol=1e-6)


def _lax_same(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Input channels below and above cpu_kernels._WGRAD_CONV_MIN_CHANNELS: both
# weight-gradient forms; k=2 has uneven 'same' padding.
@pytest.mark.parametrize('x_shape,k', [((5, 9, 7, 3), 5), ((4, 6, 5, 8), 3),
                                       ((2, 4, 4, 16), 1), ((3, 6, 5, 32), 3),
                                       ((2, 5, 4, 40), 2), ((2, 5, 4, 8), 2)])
def test_conv2d_same_matches_lax_with_gradients(x_shape, k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, x_shape[-1], 6)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((*x_shape[:3], 6)), jnp.float32)
  np.testing.assert_allclose(cpu_kernels.conv2d_same(x, w), _lax_same(x, w),
                             rtol=1e-5, atol=1e-5)
  loss = lambda conv, x, w: jnp.sum(conv(x, w) * r)
  g = jax.jit(jax.grad(functools.partial(loss, cpu_kernels.conv2d_same),
                       argnums=(0, 1)))(x, w)
  g_ref = jax.grad(functools.partial(loss, _lax_same), argnums=(0, 1))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _unblock(y):
  n, h2, w2, _, f = y.shape
  return y.reshape(n, h2, w2, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, 2 * h2, 2 * w2, f)


@pytest.mark.parametrize('k', [3, 5])
def test_space_to_depth_conv_matches_lax_with_gradients(k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 10, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 3, 4)), jnp.float32)
  np.testing.assert_allclose(_unblock(cpu_kernels.conv2d_same_s2d(x, w)),
                             _lax_same(x, w), rtol=1e-5, atol=1e-5)
  r = jnp.asarray(rng.standard_normal((3, 10, 8, 4)), jnp.float32)
  g = jax.jit(jax.grad(lambda x, w: jnp.sum(
      _unblock(cpu_kernels.conv2d_same_s2d(x, w)) * r), argnums=(0, 1)))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(_lax_same(x, w) * r),
                   argnums=(0, 1))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,blocks', [((2, 10, 8, 3), True),
                                          ((2, 9, 8, 3), False),
                                          ((2, 10, 8, 5), False)])
def test_conv_module_is_nn_conv(shape, blocks):
  """Same parameter (name, shape, initial value) and sums as the block's
  nn.Conv; space-to-depth blocks only for few channels and even sizes."""
  kw = dict(padding='SAME', use_bias=False,
            kernel_init=nn.initializers.he_normal())
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  plain, fast = nn.Conv(4, (3, 3), **kw), cpu_kernels.Conv(4, (3, 3), **kw)
  variables = plain.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['params']['kernel'],
                                fast.init(jax.random.key(0), x)['params']['kernel'])
  y = fast.apply(variables, x)
  assert y.ndim == (5 if blocks else 4)
  np.testing.assert_allclose(_unblock(y) if blocks else y,
                             plain.apply(variables, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='use_bias=False'):
    cpu_kernels.Conv(4, (3, 3)).init(jax.random.key(0), x)


def _leaves_with_paths(tree):
  return {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_variable_trees_are_identical_for_the_original():
  """Same names, shapes and dtypes at 218x178 (checkpoints move freely)."""
  trees = [jax.eval_shape(functools.partial(
      models.init_variables, models.create_model(_config(k, 'cnn')),
      image_size=(218, 178)), jax.random.key(0)) for k in ('plain', 'cpu')]
  plain, cpu = (_leaves_with_paths(t) for t in trees)
  assert plain == cpu
  assert "['params']['ConvBlock_0']['Conv_0']['kernel']" in plain
  assert "['batch_stats']['ConvBlock_3']['BatchNorm_0']['var']" in plain


def _models_and_variables(image_size):
  plain = models.create_model(_config('plain'))
  cpu = models.create_model(_config('cpu'))
  variables = models.init_variables(plain, jax.random.key(0), image_size)
  return plain, cpu, variables


@pytest.mark.parametrize('image_size', [(40, 36), (26, 22)])
def test_model_train_gradients_match_plain_flax(image_size):
  """Whole tiny model, jitted train step gradients and batch_stats."""
  plain, cpu, variables = _models_and_variables(image_size)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, *image_size, 3)).astype(np.uint8)
  labels = jnp.asarray([0., 1., 1., 0.])

  def grads(model):
    def loss(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images,
          train=True, rngs={'dropout': jax.random.key(1)},
          mutable=['batch_stats'])
      return jnp.mean((logits - labels) ** 2), updates
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  (g, s), (g_ref, s_ref) = grads(cpu), grads(plain)
  for a, b in zip(jax.tree.leaves((g, s)), jax.tree.leaves((g_ref, s_ref))):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize('image_size', [(40, 36), (26, 22)])
def test_variables_move_between_kernels(image_size):
  """Both initialise the same values; trained-looking variables from either
  give the same eval and MC-Dropout outputs in the other."""
  plain, cpu, variables = _models_and_variables(image_size)
  cpu_init = models.init_variables(cpu, jax.random.key(0), image_size)
  assert jax.tree.structure(cpu_init) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(cpu_init), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(0)
  # Running statistics away from their initial values, as after training.
  variables = jax.tree.map(
      lambda v: jnp.asarray(v * rng.uniform(0.5, 1.5, v.shape) +
                            rng.uniform(0, 0.2, v.shape), jnp.float32),
      variables)
  images = rng.integers(0, 256, (4, *image_size, 3)).astype(np.uint8)
  for kw in (dict(), dict(mc_dropout=True, rngs={'dropout': jax.random.key(3)})):
    out_plain = jax.jit(functools.partial(plain.apply, **kw))(variables, images)
    out_cpu = jax.jit(functools.partial(cpu.apply, **kw))(variables, images)
    np.testing.assert_allclose(out_cpu, out_plain, rtol=2e-3, atol=2e-5)
