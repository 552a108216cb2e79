"""Helpers and fixtures shared by several test modules.

Tests take these as fixtures (`make_workdir`, `trained_variables`,
`synthetic_batch`, `tiny_config`, `image_size`) and never import another test
module. The plain functions are imported where a fixture cannot reach: module
level code (train_test's `tiny_train_config`) and the scripts that tests run
in subprocesses (with the repository or this folder on sys.path).
"""

import functools
import os

import jax
import numpy as np
import optax
import pytest

from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import models
from gender_jax import synthetic

IMAGE_SIZE = (24, 20)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                       'configs', 'default.py')


def tiny_config(dropout=0.3):
  """Stage 2's config with the tiny model at IMAGE_SIZE (for inference)."""
  config = config_lib.load_sibling(CONFIGS, 'stage2.py')
  config.model = 'tiny'
  config.image_size = IMAGE_SIZE
  config.flatten_dropout_rate = dropout
  config.dropout_rate = dropout
  config.eval_batch_size = 16
  return config


def tiny_train_config(data_dir, stage='stage1.py', **overrides):
  """A `stage` config that trains the tiny model in seconds on `data_dir`."""
  config = config_lib.load_sibling(CONFIGS, stage)
  config.data_dir = str(data_dir)
  config.model = 'tiny'
  config.image_size = IMAGE_SIZE
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.steps_per_epoch = 6
  config.log_every_steps = 4
  for key, value in overrides.items():
    config[key] = value
  return config


def synthetic_batch(n, seed):
  """n synthetic faces at IMAGE_SIZE with labels (half male)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 2
  images = np.stack([synthetic.face_image(rng, bool(y), IMAGE_SIZE)
                     for y in labels])
  return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=None)
def trained_variables(steps=60):
  """A tiny model trained for a few Adam steps on synthetic faces (cached)."""
  model = models.create_model(tiny_config())
  variables = models.init_variables(model, jax.random.key(0), IMAGE_SIZE)
  params, stats = variables['params'], variables['batch_stats']
  images, labels = synthetic_batch(128, seed=1)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, x, y, key):
    def loss_fn(p):
      logits, new = model.apply({'params': p, 'batch_stats': stats}, x,
                                train=True, mutable=['batch_stats'],
                                rngs={'dropout': key})
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), new
    (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new['batch_stats'], opt

  for i in range(steps):
    sl = slice((i * 32) % 128, (i * 32) % 128 + 32)
    params, stats, opt = step(params, stats, opt, images[sl],
                              labels[sl].astype(np.float32),
                              jax.random.key(i))
  return {'params': params, 'batch_stats': stats}


def make_workdir(path, dropout=0.3):
  """Writes a workdir (config.json + best checkpoint) of the tiny model."""
  path = str(path)
  checkpointing.write_config(path, tiny_config(dropout))
  ckpt = checkpointing.Checkpointer(path)
  ckpt.save_best(7, trained_variables(), {'epoch': 1, 'step': 7})
  ckpt.close()
  return path


@pytest.fixture(name='image_size', scope='session')
def _image_size():
  """(height, width) of the tiny model's and the synthetic datasets' images."""
  return IMAGE_SIZE


@pytest.fixture(name='tiny_config', scope='session')
def _tiny_config():
  """`tiny_config(dropout=0.3)`."""
  return tiny_config


@pytest.fixture(name='synthetic_batch', scope='session')
def _synthetic_batch():
  """`synthetic_batch(n, seed) -> (images, labels)`."""
  return synthetic_batch


@pytest.fixture(name='trained_variables', scope='session')
def _trained_variables():
  """{'params', 'batch_stats'} of the tiny model trained on synthetic faces."""
  return trained_variables()


@pytest.fixture(name='make_workdir', scope='session')
def _make_workdir():
  """`make_workdir(path, dropout=0.3) -> path` of a tiny model's workdir."""
  return make_workdir
