"""Precise BatchNorm statistics: a numpy oracle, and 8 devices == 1 device."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gender_jax import models
from gender_jax import precise_bn
from gender_jax import sharding
from gender_jax import steps

from conftest import tiny_train_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(n, seed=0, size=(24, 20)):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (16, *size, 3), dtype=np.uint8),
           'label': rng.integers(0, 2, (16,)).astype(np.int32)}
          for _ in range(n)]


def _precise(config, mesh, batches, rng):
  model = models.create_model(config)
  state = steps.init_state(config, model, mesh)
  step = precise_bn.make_stats_step(model, functools.partial(
      steps.model_inputs, aug=config.aug if config.augment else None), mesh)
  placed = [jax.device_put(b, sharding.data_sharding(mesh)) for b in batches]
  stats = precise_bn.recompute(step, state.variables(), placed, rng,
                               epoch=7, num_batches=len(batches))
  return model, state, jax.tree.map(np.asarray, stats)


def _captured_inputs_of_norms(model, variables, images, dropout_rng):
  """Each BatchNorm layer's input (its conv's / dense's output) in train mode."""
  _, state = model.apply(
      variables, images, train=True, rngs={'dropout': dropout_rng},
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: isinstance(mdl, (
          models.nn.Conv, models.nn.Dense)))
  inter = state['intermediates']
  inputs = {f'ConvBlock_{i}': {'BatchNorm_0': inter[f'ConvBlock_{i}']['Conv_0']
                               ['__call__'][0]} for i in range(4)}
  inputs['BatchNorm_0'] = inter['Dense_0']['__call__'][0]
  return inputs


@pytest.mark.slow
def test_statistics_equal_numpy_over_the_same_batches():
  config = tiny_config('unused', kernels='plain', augment=False,
                       flatten_dropout_rate=0.3)
  mesh = sharding.make_mesh()
  rng = jax.random.key(3)
  batches = _batches(3)
  model, state, got = _precise(config, mesh, batches, rng)
  sums = None
  for i, batch in enumerate(batches):
    _, dropout_rng = steps.model_inputs(
        batch, jax.random.fold_in(jax.random.fold_in(rng, 7), i))
    inputs = _captured_inputs_of_norms(model, state.variables(),
                                       batch['image'], dropout_rng)
    stats = jax.tree.map(
        lambda y: {'mean': np.asarray(y, np.float64).reshape(-1, y.shape[-1])
                   .mean(0),
                   'var': np.asarray(y, np.float64).reshape(-1, y.shape[-1])
                   .var(0)}, inputs)
    sums = stats if sums is None else jax.tree.map(np.add, sums, stats)
  want = jax.tree.map(lambda s: s / len(batches), sums)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
  # And they differ from the (initial) running averages they replace.
  assert not np.allclose(got['BatchNorm_0']['mean'],
                         state.batch_stats['BatchNorm_0']['mean'])


@pytest.mark.slow
def test_cpu_kernels_give_the_same_statistics():
  mesh = sharding.make_mesh()
  batches = _batches(2, seed=1)
  results = [_precise(tiny_config('unused', kernels=k), mesh, batches,
                      jax.random.key(0))[2] for k in ('plain', 'cpu')]
  for a, b in zip(*map(jax.tree.leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


SHARDED_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests')
import jax, numpy as np
from jax.sharding import Mesh
from precise_bn_test import _batches, _precise
from conftest import tiny_train_config as tiny_config
assert jax.device_count() == 8
out = []
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = Mesh(np.asarray(devices), ('data',))
  config = tiny_config('unused', dropout_rate=0.3)     # Augmented, as stage 1.
  out.append(_precise(config, mesh, _batches(3, seed=2), jax.random.key(5))[2])
for a, b in zip(*map(jax.tree.leaves, out)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print('PRECISE_BN_SHARDED_OK')
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eight_devices_equal_one_device():
  out = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, REPO],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False)
  assert out.returncode == 0 and 'PRECISE_BN_SHARDED_OK' in out.stdout, (
      out.stdout[-3000:] + out.stderr[-3000:])
