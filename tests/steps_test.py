"""Tests of gender_jax.steps: the train step, its randomness, sharding."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gender_jax import augment
from gender_jax import models
from gender_jax import sharding
from gender_jax import steps
from conftest import tiny_train_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_train_step_learns_and_updates_batch_stats():
  config = tiny_config('unused')
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  state = steps.init_state(config, model, mesh)
  before = jax.tree.map(np.asarray, state.variables())
  step = steps.make_train_step(config, model, mesh)
  rng = jax.random.key(0)
  images = np.random.default_rng(0).integers(0, 256, (16, 24, 20, 3),
                                             dtype=np.uint8)
  labels = (np.arange(16) % 2).astype(np.int32)
  batch = sharding.to_global({'image': images, 'label': labels}, mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics.compute()['loss']))
  assert int(state.step) == 3
  assert all(np.isfinite(losses))
  for x, y in zip(_leaves(before['batch_stats']), _leaves(state.batch_stats)):
    assert not np.allclose(x, y)
  for x, y in zip(_leaves(before['params']), _leaves(state.params)):
    assert not np.allclose(x, y)
  assert steps.get_learning_rate(state) == pytest.approx(1e-3)
  state = steps.set_learning_rate(state, 5e-4, mesh)
  assert steps.get_learning_rate(state) == pytest.approx(5e-4)
  # Compiled once, not once per epoch: another rate reuses the program
  # (the cache also holds other tests' states, of other shapes).
  compiled = steps._set_lr_fn(mesh)._cache_size()
  state = steps.set_learning_rate(state, 2.5e-4, mesh)
  assert steps.get_learning_rate(state) == pytest.approx(2.5e-4)
  assert steps._set_lr_fn(mesh)._cache_size() == compiled


def test_model_inputs_is_the_one_derivation_of_step_randomness():
  """A step key splits into (augmentation, dropout) keys, as in every
  earlier version (so runs draw the same numbers); the loop's own jitted
  augmentation call (`augment_step`) draws step `step`'s images from
  `fold_in(rng, step)`, and each step gets its own augmentation."""
  config = tiny_config('unused')
  images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3),
                                             dtype=np.uint8)
  batch = {'image': images, 'label': np.arange(4, dtype=np.int32) % 2}
  rng = jax.random.key(4)
  key = jax.random.fold_in(rng, 5)
  aug_key, dropout_key = jax.random.split(key)
  got_images, got_dropout = steps.model_inputs(batch, key, aug=config.aug)
  np.testing.assert_array_equal(
      np.asarray(got_images),
      np.asarray(augment.augment_batch(aug_key, images, config.aug)))
  np.testing.assert_array_equal(jax.random.key_data(got_dropout),
                                jax.random.key_data(dropout_key))
  plain, plain_dropout = steps.model_inputs(batch, key)
  assert plain is images
  np.testing.assert_array_equal(jax.random.key_data(plain_dropout),
                                jax.random.key_data(dropout_key))
  got = [np.asarray(steps.augment_step(batch, rng, step, aug=config.aug)
                    ['image']) for step in (0, 5)]
  np.testing.assert_array_equal(got[1], np.asarray(got_images))
  assert not np.allclose(got[0], got[1])


SHARDED_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, sys.argv[1])
from tests.conftest import tiny_train_config as tiny_config
from gender_jax import models, sharding, steps
assert jax.device_count() == 8, jax.devices()
results = []
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = Mesh(np.asarray(devices), ('data',))
  config = tiny_config('unused', dropout_rate=0.3)
  model = models.create_model(config)
  state = steps.init_state(config, model, mesh)
  step = steps.make_train_step(config, model, mesh)
  rng = np.random.default_rng(0)
  for i in range(3):
    batch = {'image': rng.integers(0, 256, (16, 24, 20, 3), dtype=np.uint8),
             'label': rng.integers(0, 2, (16,)).astype(np.int32)}
    batch = jax.device_put(batch, sharding.data_sharding(mesh))
    state, metrics = step(state, batch, jax.random.key(7))
  kernel = state.params['Dense_0']['kernel']
  assert len(kernel.sharding.device_set) == len(devices)
  results.append((jax.tree.map(np.asarray, state.variables()),
                  float(metrics.compute()['loss'])))
(a, loss_a), (b, loss_b) = results
assert abs(loss_a - loss_b) < 1e-4, (loss_a, loss_b)
for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
  np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
print('SHARDED_OK', loss_a, loss_b)
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_step_equals_single_device_step():
  """3 steps (augmentation + both dropouts) on 8 CPU devices vs 1 device."""
  out = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, REPO],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                       check=False)
  assert out.returncode == 0 and 'SHARDED_OK' in out.stdout, (
      out.stdout[-3000:] + out.stderr[-3000:])
