"""Training and evaluation: sharded jitted steps and the Keras-style epoch loop.

The loop reproduces the original Keras `fit` recipe:
* Nadam on binary cross-entropy; stage-1 augmentation on device in the step.
* Once per epoch, after evaluating the validation split:
  - ReduceLROnPlateau on val_loss (`optax.contrib.reduce_on_plateau` with
    rtol=0, atol=min_delta, min_scale=min_lr/lr: Keras' rule), its state kept
    in the loop bookkeeping and the learning rate written into the optimizer
    state (`optax.inject_hyperparams`);
  - EarlyStopping on val_accuracy with Keras' exact arithmetic (see
    `update_early_stopping` for why not `flax.training.early_stopping`),
    saving the best model exactly when it reports an improvement (Keras
    `restore_best_weights`).
* Checkpoints (orbax): the latest train state each epoch (and every
  `checkpoint_every_steps`) for resuming, and the best model for stage 2 and
  prediction. A run restarted in the same workdir resumes from the latest,
  mid-epoch too: the epoch's data order and the per-step randomness are
  functions of (seed, epoch, step), so it continues as if never stopped
  (only that epoch's logged training averages cover just the resumed part).
* After training, the best model is evaluated on the validation split and, if
  present, the test split; the summary goes to `<workdir>/results.json`.

Steps are pure functions jitted with `NamedSharding`s over the ('data',) mesh
of all devices of all processes, so one code path covers CPU, GPU, TPU and
several hosts. Only host 0 writes logs, TensorBoard events and JSON files.
"""

import functools
import json
import math
import os
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
from clu import metric_writers
from clu import metrics
from clu import periodic_actions
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax.contrib import reduce_on_plateau

from gender_jax import augment
from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import dataset
from gender_jax import input_pipeline
from gender_jax import models
from gender_jax import sharding

RESULTS_FILE = 'results.json'
# Keras Nadam defaults (beta_1, beta_2, epsilon).
NADAM_B1, NADAM_B2, NADAM_EPS = 0.9, 0.999, 1e-7


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics."""
  batch_stats: Any = None

  def variables(self) -> Dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  """Exact over a split: sums over the mask divided by the mask count."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


# ----------------------------------------------------------------------------
# Multi-host.


def maybe_initialize_distributed(config: Optional[ml_collections.ConfigDict]
                                 = None) -> bool:
  """Calls `jax.distributed.initialize` when asked to; True if it did.

  Asked by `config.distributed` or by the environment
  (`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`).
  Without the address, `initialize()` auto-detects the cluster (TPU pods,
  SLURM, ...). On CPU, collectives across processes use gloo. Must run before
  anything touches the devices.
  """
  env = os.environ
  wanted = bool(config is not None and config.get('distributed', False))
  if not (wanted or env.get('JAX_COORDINATOR_ADDRESS')):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if env.get('JAX_NUM_PROCESSES'):
    kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
  if env.get('JAX_PROCESS_ID'):
    kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
  if env.get('JAX_PLATFORMS', '').startswith('cpu') or not _has_accelerator():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d devices in all.',
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def _has_accelerator() -> bool:
  """Whether a GPU/TPU plugin is installed (without initialising backends)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu',
                          'jax_rocm60_plugin'))


# ----------------------------------------------------------------------------
# State, steps.


def create_optimizer(config) -> optax.GradientTransformation:
  """Nadam (Keras defaults) with the learning rate settable in its state."""
  return optax.inject_hyperparams(optax.nadam)(
      learning_rate=config.learning_rate, b1=NADAM_B1, b2=NADAM_B2,
      eps=NADAM_EPS)


def create_train_state(config, model, rng) -> TrainState:
  """A fresh TrainState (random init, new optimizer)."""
  variables = models.init_variables(model, rng, tuple(config.image_size))
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           tx=create_optimizer(config))


def init_state(config, model, mesh) -> TrainState:
  """The replicated initial state; from `config.init_from`'s best if set.

  Stage 2: params and batch_stats come from the stage-1 workdir's best
  checkpoint (restored into this config's model: only shapes must agree);
  the optimizer starts fresh.
  """
  if config.init_from:
    _check_init_from(config)
  replicated = sharding.replicated(mesh)
  rng = jax.random.key(config.seed)
  state = jax.jit(functools.partial(create_train_state, config, model),
                  out_shardings=replicated)(rng)
  if config.init_from:
    variables, meta = checkpointing.restore_best(config.init_from, config,
                                                 sharding=replicated)
    logging.info('Initialised from %s (best epoch %s, val_accuracy %s).',
                 config.init_from, meta.get('epoch'), meta.get('val_accuracy'))
    state = state.replace(params=variables['params'],
                          batch_stats=variables['batch_stats'])
  return state


def _check_init_from(config) -> None:
  """Stage 2 must build the model stage 1 trained (same size and widths)."""
  source = checkpointing.read_config(config.init_from)
  for key in ('model', 'image_size'):
    if tuple(np.atleast_1d(source[key])) != tuple(np.atleast_1d(config[key])):
      raise TrainingError(
          f'config.{key}={config[key]!r} but the run in config.init_from='
          f'{config.init_from!r} used {source[key]!r}; fine-tune with the same '
          f'--config.{key} as stage 1.')


def abstract_state(config, model, mesh):
  """Shapes, dtypes and shardings of the state (for orbax restore)."""
  replicated = sharding.replicated(mesh)
  shapes = jax.eval_shape(functools.partial(create_train_state, config, model),
                          jax.random.key(0))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      shapes)


def per_example_metrics(logits, labels):
  """Binary cross-entropy and correctness (male when sigmoid >= 0.5)."""
  labels = labels.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels)
  correct = ((logits >= 0).astype(jnp.float32) == labels).astype(jnp.float32)
  return loss, correct


def train_step(state: TrainState, batch, rng, *, model, config):
  """One Nadam step on a global batch; returns (state, TrainMetrics).

  Augmentation (if `config.augment`) and dropout use keys folded from `rng`
  and the step number, so a resumed run draws the same randomness.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  aug_rng, dropout_rng = jax.random.split(step_rng)
  images = batch['image']
  if config.augment:
    images = augment.augment_batch(aug_rng, images, config.aug)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, correct = per_example_metrics(logits, batch['label'])
    return loss.mean(), (updates['batch_stats'], loss, correct)

  grads, (batch_stats, loss, correct) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, TrainMetrics.single_from_model_output(loss=loss,
                                                      accuracy=correct)


def eval_step(variables, batch, *, model):
  """Masked loss/accuracy sums of a padded global batch (inference mode)."""
  logits = model.apply(variables, batch['image'], train=False)
  loss, correct = per_example_metrics(logits, batch['label'])
  return EvalMetrics.single_from_model_output(loss=loss, accuracy=correct,
                                              mask=batch['mask'])


def make_train_step(config, model, mesh) -> Callable:
  """`train_step` jitted for `mesh`: (state, batch, rng) -> (state, metrics).

  State and rng replicated, batch split over 'data'; the state is donated.
  """
  replicated = sharding.replicated(mesh)
  step = functools.partial(train_step, model=model, config=config)
  return jax.jit(step, in_shardings=(replicated, sharding.data_sharding(mesh),
                                     replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model, mesh) -> Callable:
  """`eval_step` jitted for `mesh`: (variables, batch) -> EvalMetrics."""
  replicated = sharding.replicated(mesh)
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(replicated, sharding.data_sharding(mesh)),
                 out_shardings=replicated)


def set_learning_rate(state: TrainState, learning_rate: float,
                      mesh) -> TrainState:
  """Writes `learning_rate` into the injected Nadam hyperparameters."""
  def set_lr(state, lr):
    hyperparams = dict(state.opt_state.hyperparams)
    hyperparams['learning_rate'] = jnp.asarray(
        lr, hyperparams['learning_rate'].dtype)
    return state.replace(opt_state=state.opt_state._replace(
        hyperparams=hyperparams))
  replicated = sharding.replicated(mesh)
  return jax.jit(set_lr, out_shardings=replicated, donate_argnums=0)(
      state, learning_rate)


def get_learning_rate(state: TrainState) -> float:
  return float(state.opt_state.hyperparams['learning_rate'])


def evaluate(eval_fn, variables, config, builder, mesh,
             split: str) -> Dict[str, float]:
  """Exact loss/accuracy of `variables` over a split (or its eval_steps cap)."""
  total = None
  for batch in input_pipeline.eval_iterator(config, builder, mesh, split):
    update = eval_fn(variables, batch)
    total = update if total is None else total.merge(update)
  if total is None:
    raise TrainingError(f'split {split!r} yielded no evaluation batches.')
  values = {k: float(v) for k, v in total.compute().items()}
  values['count'] = int(total.loss.count)
  return values


# ----------------------------------------------------------------------------
# Keras callbacks as pure bookkeeping (JSON-serialisable, checkpointed).


def _plateau(config):
  return reduce_on_plateau(
      factor=config.plateau_factor, patience=config.plateau_patience,
      rtol=0.0, atol=config.plateau_min_delta,
      min_scale=config.min_learning_rate / config.learning_rate)


def _json_float(x: float) -> Optional[float]:
  return None if math.isinf(x) else float(x)


def _from_json_float(x: Optional[float], default: float) -> float:
  return default if x is None else float(x)


def new_loop_state() -> Dict[str, Any]:
  """Bookkeeping of a fresh run."""
  return {
      'epoch': 0,          # Next epoch to run (0-based).
      'epoch_step': 0,     # Batches of `epoch` already trained (mid-epoch).
      'plateau': {'best_value': None, 'plateau_count': 0, 'scale': 1.0,
                  'cooldown_count': 0},
      'early_stopping': {'best_metric': None, 'patience_count': 0},
      'best': None,        # Meta of the best model so far.
      'stopped_early': False,
      'history': [],
      'train_seconds': 0.0,
  }


def update_plateau(config, plateau: Dict[str, Any],
                   val_loss: float) -> Dict[str, Any]:
  """One Keras ReduceLROnPlateau epoch update; returns the new bookkeeping."""
  tx = _plateau(config)
  state = tx.init({})._replace(
      best_value=jnp.asarray(
          _from_json_float(plateau['best_value'], float('inf')), jnp.float32),
      plateau_count=jnp.asarray(plateau['plateau_count'], jnp.int32),
      scale=jnp.asarray(plateau['scale'], jnp.float32),
      cooldown_count=jnp.asarray(plateau['cooldown_count'], jnp.int32))
  _, state = tx.update({}, state, value=jnp.asarray(val_loss, jnp.float32))
  return {'best_value': _json_float(float(state.best_value)),
          'plateau_count': int(state.plateau_count),
          'scale': float(state.scale),
          'cooldown_count': int(state.cooldown_count)}


def update_early_stopping(config, es: Dict[str, Any], val_accuracy: float):
  """One Keras EarlyStopping epoch update: (bookkeeping, improved, stop).

  Keras' rule written out rather than `flax.training.early_stopping`: flax
  tests `best - metric > min_delta`, Keras `current - min_delta > best`, and
  the two round differently when an accuracy gain is exactly `min_delta` (3
  images of a 3,000-image validation set), which Keras rejects and flax
  accepts; flax also stops one epoch later than Keras.
  """
  best = _from_json_float(es['best_metric'], -float('inf'))
  wait = es['patience_count'] + 1
  improved = float(val_accuracy) - config.early_stopping_min_delta > best
  if improved:
    best, wait = float(val_accuracy), 0
  stop = not improved and wait >= config.early_stopping_patience
  return ({'best_metric': _json_float(best), 'patience_count': wait},
          improved, stop)


# ----------------------------------------------------------------------------
# The loop.


def _check_finite(values: Dict[str, float], what: str, step: int,
                  checkpointer: checkpointing.Checkpointer, workdir: str):
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    last = checkpointer.latest_step()
    kept = (f'the last good checkpoint (step {last}) in '
            f'{os.path.join(workdir, "checkpoints")} is intact'
            if last is not None else 'no checkpoint had been written yet')
    raise TrainingError(
        f'Non-finite {what} at step {step}: {bad}. Training stopped; {kept}. '
        'Lower --config.learning_rate or check the data.')


def _write_json(path: str, data: Dict[str, Any]) -> None:
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _final_evaluation(config, builder, mesh, model, workdir,
                      loop) -> Dict[str, Any]:
  """Evaluates the best model on validation and (if present) test."""
  variables, meta = checkpointing.restore_best(
      workdir, config, sharding=sharding.replicated(mesh))
  eval_fn = make_eval_step(model, mesh)
  results = {}
  for split in (config.eval_split, 'test'):
    if split == 'test' and 'test' not in builder.info.splits:
      continue
    results[split] = evaluate(eval_fn, variables, config, builder, mesh, split)
    logging.info('Best model (epoch %d) on %s: %s', meta['epoch'], split,
                 results[split])
  return {
      'best_epoch': meta['epoch'],
      'best_val_accuracy': meta['val_accuracy'],
      'best_step': meta['step'],
      'epochs_run': loop['epoch'],
      'stopped_early': loop['stopped_early'],
      'train_seconds': round(loop['train_seconds'], 1),
      'init_from': config.init_from,
      'final_evaluation': results,
      'history': loop['history'],
  }


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir`, then evaluates the best model.

  Returns the summary also written to `<workdir>/results.json`.
  """
  start_time = time.time()
  maybe_initialize_distributed(config)
  config_lib.validate(config)
  builder = dataset.load_builder(config.data_dir, config.dataset)
  stored = input_pipeline.stored_image_size(builder)
  mesh = sharding.make_mesh()
  checkpointing.write_config(workdir, config)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  model = models.create_model(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    summary = _train(config, workdir, builder, mesh, model, checkpointer,
                     writer)
    summary['total_seconds'] = round(time.time() - start_time, 1)
    summary['image_size'] = list(config.image_size)
    summary['stored_image_size'] = list(stored)
    summary['devices'] = jax.device_count()
    summary['processes'] = jax.process_count()
    _write_json(os.path.join(workdir, RESULTS_FILE), summary)
    final = summary['final_evaluation']
    writer.write_scalars(summary['best_step'], {
        f'final/{split}_{k}': v for split, r in final.items()
        for k, v in r.items() if k != 'count'})
  finally:
    writer.flush()
    checkpointer.close()
  return summary


def _train(config, workdir, builder, mesh, model, checkpointer, writer):
  """The epoch loop; returns the summary of `_final_evaluation`."""
  steps_per_epoch = input_pipeline.train_steps_per_epoch(config, builder)
  restored = checkpointer.restore_latest(abstract_state(config, model, mesh))
  if restored is None:
    state, loop = init_state(config, model, mesh), new_loop_state()
  else:
    state, loop = restored
    logging.info('Resuming from %s at step %d (epoch %d, batch %d).',
                 workdir, int(state.step), loop['epoch'] + 1,
                 loop['epoch_step'])
  train_fn = make_train_step(config, model, mesh)
  eval_fn = make_eval_step(model, mesh)
  rng = jax.jit(lambda: jax.random.key(config.seed),
                out_shardings=sharding.replicated(mesh))()
  step = int(state.step)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_epochs * steps_per_epoch, writer=writer)
  hooks = [report_progress]

  while loop['epoch'] < config.num_epochs and not loop['stopped_early']:
    epoch = loop['epoch']
    lr = config.learning_rate * loop['plateau']['scale']
    state = set_learning_rate(state, lr, mesh)
    epoch_metrics = window = None
    epoch_start = window_start = time.time()
    window_steps = 0
    batches = input_pipeline.train_iterator(config, builder, mesh, epoch,
                                            loop['epoch_step'])
    for epoch_step, batch in enumerate(batches, start=loop['epoch_step'] + 1):
      state, update = train_fn(state, batch, rng)
      step += 1
      window_steps += 1
      window = update if window is None else window.merge(update)
      epoch_metrics = (update if epoch_metrics is None
                       else epoch_metrics.merge(update))
      for hook in hooks:
        hook(step)
      if step % config.log_every_steps == 0:
        values = {f'train_{k}': float(v)
                  for k, v in window.compute().items()}
        _check_finite(values, 'training loss', step, checkpointer, workdir)
        now = time.time()
        values['images_per_sec'] = (window_steps * config.batch_size
                                    / (now - window_start))
        values['learning_rate'] = lr
        writer.write_scalars(step, values)
        window, window_steps, window_start = None, 0, now
      if (config.checkpoint_every_steps
          and step % config.checkpoint_every_steps == 0
          and epoch_step < steps_per_epoch):
        values = {k: float(v) for k, v in epoch_metrics.compute().items()}
        _check_finite(values, 'training loss', step, checkpointer, workdir)
        checkpointer.save_latest(step, state, {**loop,
                                               'epoch_step': epoch_step})
    train_seconds = time.time() - epoch_start
    trained = steps_per_epoch - loop['epoch_step']
    if epoch_metrics is None:
      raise TrainingError(f'epoch {epoch + 1} yielded no training batches.')

    train_values = {k: float(v) for k, v in epoch_metrics.compute().items()}
    _check_finite(train_values, 'training loss', step, checkpointer, workdir)
    val = evaluate(eval_fn, state.variables(), config, builder, mesh,
                   config.eval_split)
    _check_finite({'val_loss': val['loss']}, 'validation loss', step,
                  checkpointer, workdir)
    plateau = update_plateau(config, loop['plateau'], val['loss'])
    es, improved, stop = update_early_stopping(config, loop['early_stopping'],
                                               val['accuracy'])
    record = {
        'epoch': epoch + 1, 'step': step, 'learning_rate': lr,
        'train_loss': train_values['loss'],
        'train_accuracy': train_values['accuracy'],
        'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
        'images_per_sec': trained * config.batch_size / train_seconds,
        'train_seconds': train_seconds,
        'epoch_seconds': time.time() - epoch_start,
    }
    if improved:
      best = {'epoch': epoch + 1, 'step': step, 'val_accuracy': val['accuracy'],
              'val_loss': val['loss'], 'init_from': config.init_from}
      checkpointer.save_best(step, state.variables(), best)
      loop['best'] = best
    loop.update(epoch=epoch + 1, epoch_step=0, plateau=plateau,
                early_stopping=es, stopped_early=bool(stop),
                history=loop['history'] + [record],
                train_seconds=loop['train_seconds'] + record['epoch_seconds'])
    checkpointer.save_latest(step, state, loop)
    logging.info(
        'Epoch %d/%d: loss %.4f acc %.4f | val_loss %.4f val_acc %.4f | lr %g '
        '| %.0f images/s%s%s', epoch + 1, config.num_epochs,
        record['train_loss'], record['train_accuracy'], record['val_loss'],
        record['val_accuracy'], lr, record['images_per_sec'],
        ' | best' if improved else '', ' | early stop' if stop else '')
    writer.write_scalars(step, {
        'epoch': epoch + 1, 'epoch_train_loss': record['train_loss'],
        'epoch_train_accuracy': record['train_accuracy'],
        'val_loss': record['val_loss'], 'val_accuracy': record['val_accuracy'],
        'learning_rate': lr, 'epoch_images_per_sec': record['images_per_sec']})
    writer.flush()

  if loop['best'] is None:
    raise TrainingError(f'{workdir} has no best model: no epoch finished.')
  return _final_evaluation(config, builder, mesh, model, workdir, loop)
