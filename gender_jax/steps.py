"""The train state and the jitted steps of training.

Steps are pure functions jitted with `NamedSharding`s over the ('data',) mesh
of all devices of all processes (state replicated, batches split), so one
code path covers CPU, GPU, TPU and several hosts. A train step's randomness
(augmentation, dropout) comes from `model_inputs` with a key that depends on
the run's key and the step only, so a resumed run draws what an uninterrupted
one would; precise BN draws its batches through the same function.
"""

import functools
from typing import Any, Callable, Dict, Optional

from absl import logging
from clu import metrics
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gender_jax import augment
from gender_jax import checkpointing
from gender_jax import errors
from gender_jax import input_pipeline
from gender_jax import models
from gender_jax import precise_bn
from gender_jax import sharding

# Keras Nadam defaults (beta_1, beta_2, epsilon).
NADAM_B1, NADAM_B2, NADAM_EPS = 0.9, 0.999, 1e-7
# Config fields that shape the variables: a workdir's checkpoints only fit a
# run with the same values.
_ARCHITECTURE_FIELDS = ('model', 'image_size')


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics."""
  batch_stats: Any = None

  def variables(self) -> Dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class Metrics(metrics.Collection):
  """Mean training loss and accuracy of the steps merged into it."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


def create_optimizer(config) -> optax.GradientTransformation:
  """Nadam (Keras defaults) with the learning rate settable in its state."""
  return optax.inject_hyperparams(optax.nadam)(
      learning_rate=config.learning_rate, b1=NADAM_B1, b2=NADAM_B2,
      eps=NADAM_EPS)


def create_train_state(config, model, variables) -> TrainState:
  """A TrainState of `variables` ({'params','batch_stats'}), step 0 and a new
  optimizer."""
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           tx=create_optimizer(config))


def init_state(config, model, mesh) -> TrainState:
  """The replicated initial state; from `config.init_from`'s best if set.

  Stage 2: params and batch_stats come from the stage-1 workdir's best
  checkpoint (restored into this config's model: only shapes must agree);
  the optimizer starts fresh.
  """
  replicated = sharding.replicated(mesh)
  create = functools.partial(create_train_state, config, model)
  if not config.init_from:
    return jax.jit(lambda rng: create(models.init_variables(
        model, rng, tuple(config.image_size))), out_shardings=replicated)(
            jax.random.key(config.seed))
  check_init_from(config)
  variables, meta = checkpointing.restore_best(config.init_from, config,
                                               sharding=replicated)
  logging.info('Initialised from %s (best epoch %s, val_accuracy %s).',
               config.init_from, meta.get('epoch'), meta.get('val_accuracy'))
  return jax.jit(create, out_shardings=replicated)(variables)


def architecture_mismatch(config, other, other_name: str) -> Optional[str]:
  """Names the architecture fields where `config` and `other` differ."""
  diffs = [f'{key}={config[key]!r} here, {other[key]!r} in {other_name}'
           for key in _ARCHITECTURE_FIELDS
           if tuple(np.atleast_1d(other[key])) != tuple(
               np.atleast_1d(config[key]))]
  return '; '.join(diffs) or None


def check_init_from(config) -> None:
  """Stage 2 must build the model stage 1 trained (same size and widths)."""
  source = checkpointing.read_config(config.init_from)
  mismatch = architecture_mismatch(config, source, config.init_from)
  if mismatch:
    raise errors.UserError(
        f'config.init_from={config.init_from!r} holds another model '
        f'({mismatch}); fine-tune with the same --config.model and '
        '--config.image_size as stage 1.')


def per_example_metrics(logits, labels):
  """Binary cross-entropy and correctness (male when sigmoid >= 0.5)."""
  labels = labels.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels)
  correct = ((logits >= 0).astype(jnp.float32) == labels).astype(jnp.float32)
  return loss, correct


def model_inputs(batch, key, *, aug=None):
  """(images, dropout key) a step feeds the model, from its own `key`: the
  batch's images, augmented by `aug` (a `config.aug`) unless None.

  The one derivation of a step's randomness: the train step (its key
  `fold_in(run key, step)`) and precise BN (`fold_in` of its key with the
  epoch and batch) split their key here into augmentation and dropout keys.
  """
  aug_key, dropout_key = jax.random.split(key)
  images = batch['image']
  if aug is not None:
    images = augment.augment_batch(aug_key, images, aug)
  return images, dropout_key


def augment_step(batch, rng, step, *, aug):
  """`batch` with its images augmented as train step `step` trains on them."""
  images, _ = model_inputs(batch, jax.random.fold_in(rng, step), aug=aug)
  return {**batch, 'image': images}


def train_step(state: TrainState, batch, rng, *, model):
  """One Nadam step on a global batch of (already augmented) images; returns
  (state, Metrics). Dropout uses `model_inputs`' key of step `state.step`."""
  images, dropout_rng = model_inputs(batch,
                                     jax.random.fold_in(rng, state.step))

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, correct = per_example_metrics(logits, batch['label'])
    return loss.mean(), (updates['batch_stats'], loss, correct)

  grads, (batch_stats, loss, correct) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, Metrics.single_from_model_output(loss=loss, accuracy=correct)


def make_train_step(config, model, mesh) -> Callable:
  """(state, batch, rng) -> (state, metrics): `augment_step` (when
  `config.augment`), then `train_step`, each jitted for `mesh`.

  State and rng replicated, batch split over 'data'; the state is donated.
  Augmentation is its own jitted call: compiled into the train step, it made
  the XLA:CPU step slower by several times its own cost (benchmarks/README.md,
  'End-to-end training speed'). On GPU/TPU the split costs one more launch
  per step.
  """
  replicated = sharding.replicated(mesh)
  data = sharding.data_sharding(mesh)
  train_fn = jax.jit(functools.partial(train_step, model=model),
                     in_shardings=(replicated, data, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0)
  if not config.augment:
    return train_fn
  augment_fn = jax.jit(functools.partial(augment_step, aug=config.aug),
                       in_shardings=(data, replicated, replicated),
                       out_shardings=data)

  def step(state, batch, rng):
    return train_fn(state, augment_fn(batch, rng, state.step), rng)
  return step


def _set_lr(state: TrainState, lr) -> TrainState:
  hyperparams = dict(state.opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(
      lr, hyperparams['learning_rate'].dtype)
  return state.replace(opt_state=state.opt_state._replace(
      hyperparams=hyperparams))


@functools.lru_cache(maxsize=None)
def _set_lr_fn(mesh):
  """`_set_lr` jitted once per mesh (it runs every epoch)."""
  return jax.jit(_set_lr, out_shardings=sharding.replicated(mesh),
                 donate_argnums=0)


def set_learning_rate(state: TrainState, learning_rate: float,
                      mesh) -> TrainState:
  """Writes `learning_rate` into the injected Nadam hyperparameters."""
  return _set_lr_fn(mesh)(state, learning_rate)


def get_learning_rate(state: TrainState) -> float:
  return float(state.opt_state.hyperparams['learning_rate'])


def make_precise_bn(config, model, mesh) -> Callable:
  """(variables, builder, epoch) -> BatchNorm statistics recomputed on epoch
  `epoch`'s first `config.precise_bn_batches` training batches, as the train
  step sees them (see `gender_jax.precise_bn`)."""
  stats_step = precise_bn.make_stats_step(
      model, functools.partial(
          model_inputs, aug=config.aug if config.augment else None), mesh)
  rng = jax.jit(lambda: jax.random.key(config.seed + 1),
                out_shardings=sharding.replicated(mesh))()

  def batch_stats(variables, builder, epoch: int):
    batches = input_pipeline.train_iterator(config, builder, mesh, epoch)
    return precise_bn.recompute(stats_step, variables, batches, rng, epoch,
                                config.precise_bn_batches)
  return batch_stats
