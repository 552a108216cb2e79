"""Precise BatchNorm: population statistics recomputed for the current weights.

BatchNorm's running averages (momentum 0.99) trail the weights by ~100 steps.
When the weights move fast (a fine-tune with a fresh optimizer, or a short
run) the averages describe an older network and every inference-mode logit
shifts. "Precise BN" (Wu & Johnson, "Rethinking Batch in BatchNorm", 2021;
fvcore/pycls `update_bn_stats`, mmpretrain's PreciseBNHook) replaces them with
the average, over N training batches as training sees them (augmentation and
dropout included), of each BatchNorm layer's batch mean and batch variance,
computed with the current parameters.

Each batch's statistics come from the model's own train-mode update: applied
with zero running averages, a BatchNorm layer stores (1 - momentum) * batch
statistic, which is divided back out. The step is jitted over the ('data',)
mesh like the train step, so a batch's mean and variance are over the whole
global batch, exactly, however many devices hold it.
"""

import itertools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from gender_jax import models
from gender_jax import sharding


def batch_statistics(variables, images, dropout_rng, *, model) -> Any:
  """Each BatchNorm layer's batch {'mean', 'var'} of `images` in train mode."""
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updates = model.apply(
      {'params': variables['params'], 'batch_stats': zeros}, images,
      train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  return jax.tree.map(lambda x: x / (1.0 - models.BN_MOMENTUM),
                      updates['batch_stats'])


def make_stats_step(model, prepare: Callable, mesh) -> Callable:
  """Jitted (sums, variables, batch, rng, epoch, index) -> sums + the batch
  statistics of batch `index` of epoch `epoch`.

  `prepare(batch, key) -> (images, dropout_key)` (`steps.model_inputs`)
  turns a batch into the images the train step feeds the model
  (augmentation) and its dropout key; its key is `rng` folded with `epoch`
  and `index`.
  """
  def step(sums, variables, batch, rng, epoch, index):
    rng = jax.random.fold_in(jax.random.fold_in(rng, epoch), index)
    images, dropout_rng = prepare(batch, rng)
    stats = batch_statistics(variables, images, dropout_rng, model=model)
    return jax.tree.map(jnp.add, sums, stats)
  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated,
                                     sharding.data_sharding(mesh), replicated,
                                     replicated, replicated),
                 out_shardings=replicated, donate_argnums=0)


def recompute(stats_step: Callable, variables, batches: Iterable, rng,
              epoch: int, num_batches: int):
  """Population batch_stats: the mean over the first `num_batches` of
  `batches` (epoch `epoch`'s) of each layer's batch mean and batch variance
  (`stats_step` from `make_stats_step`)."""
  sums = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  count = 0
  for batch in itertools.islice(batches, num_batches):
    sums = stats_step(sums, variables, batch, rng, np.int32(epoch),
                      np.int32(count))
    count += 1
  if not count:
    raise ValueError('precise BatchNorm got no training batches.')
  return jax.tree.map(lambda s: s / count, sums)
