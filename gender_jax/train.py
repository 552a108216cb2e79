"""Training and evaluation: sharded jitted steps and the Keras-style epoch loop.

The loop reproduces the original Keras `fit` recipe:
* Nadam on binary cross-entropy; stage-1 augmentation on device, as its own
  jitted call before each train step.
* Once per epoch, after evaluating the validation split, Keras'
  ReduceLROnPlateau on val_loss and EarlyStopping on val_accuracy
  (`gender_jax.callbacks`), saving the best model exactly when EarlyStopping
  reports an improvement (Keras `restore_best_weights`).
* Checkpoints (orbax): the latest train state each epoch (and every
  `checkpoint_every_steps`) for resuming, and the best model for stage 2 and
  prediction. A run restarted in the same workdir resumes from the latest,
  mid-epoch too: the epoch's data order and the per-step randomness are
  functions of (seed, epoch, step), so it continues as if never stopped
  (only that epoch's logged training averages cover just the resumed part).
* After training, the best model is evaluated on the validation split and, if
  present, the test split; the summary goes to `<workdir>/results.json`.
  With `config.calibrate`, a temperature for its p(male) is then fitted on
  the validation split (`<workdir>/calibration.json`, `gender_jax.calibration`).

Two additions to the Keras recipe, both config fields:
* `precise_bn_batches` > 0 recomputes the BatchNorm statistics for the
  current weights before every validation (`gender_jax.precise_bn`), so early
  stopping, the best checkpoint, evaluation and labelling see statistics that
  match the weights instead of running averages that trail them.
* `init_baseline` (stage 2): the model restored from `init_from` is evaluated
  before the first step and recorded as epoch 0, in the history, TensorBoard
  and as the first best model. Early stopping counts from it, so a fine-tune
  that never beats its starting point ends with the starting model in
  `best/` (its weights; with precise BN, BatchNorm statistics recomputed
  for them, as for every validated model). This is the one place the loop departs from Keras' `fit`, whose
  EarlyStopping keeps the best of the epochs it trained, however bad: a
  fine-tune that swings down early (a fresh Nadam at 1e-3) and is stopped
  there would otherwise hand on a worse model than it was given.

Steps are pure functions jitted with `NamedSharding`s over the ('data',) mesh
of all devices of all processes, so one code path covers CPU, GPU, TPU and
several hosts. Only host 0 writes logs, TensorBoard events and JSON files;
host 0 also holds the workdir's lock file for the whole run.
"""

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

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

from gender_jax import augment
from gender_jax import calibration
from gender_jax import callbacks
from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import dataset
from gender_jax import errors
from gender_jax import fileio
from gender_jax import input_pipeline
from gender_jax import locking
from gender_jax import models
from gender_jax import precise_bn
from gender_jax import sharding

RESULTS_FILE = 'results.json'
LOCK_FILE = 'lock'
# Keras Nadam defaults (beta_1, beta_2, epsilon).
NADAM_B1, NADAM_B2, NADAM_EPS = 0.9, 0.999, 1e-7
# Config fields that shape the variables: a workdir's checkpoints only fit a
# run with the same values.
_ARCHITECTURE_FIELDS = ('model', 'image_size')


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics."""
  batch_stats: Any = None

  def variables(self) -> Dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class Metrics(metrics.Collection):
  """Mean loss and accuracy; over a padded eval batch the mask makes it exact
  (sums over real examples divided by their count)."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


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


def _architecture_mismatch(config, other, other_name: str) -> Optional[str]:
  """Names the architecture fields where `config` and `other` differ."""
  diffs = [f'{key}={config[key]!r} here, {other[key]!r} in {other_name}'
           for key in _ARCHITECTURE_FIELDS
           if tuple(np.atleast_1d(other[key])) != tuple(
               np.atleast_1d(config[key]))]
  return '; '.join(diffs) or None


def _check_init_from(config) -> None:
  """Stage 2 must build the model stage 1 trained (same size and widths)."""
  source = checkpointing.read_config(config.init_from)
  mismatch = _architecture_mismatch(config, source, config.init_from)
  if mismatch:
    raise errors.UserError(
        f'config.init_from={config.init_from!r} holds another model '
        f'({mismatch}); fine-tune with the same --config.model and '
        '--config.image_size as stage 1.')


def _check_resume(config, workdir: str) -> None:
  """A workdir with checkpoints only resumes with the same architecture."""
  if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    return
  mismatch = _architecture_mismatch(config, checkpointing.read_config(workdir),
                                    os.path.join(workdir, 'config.json'))
  if mismatch:
    raise errors.UserError(
        f'--workdir={workdir} holds a run of another model ({mismatch}); '
        'resume it with its own settings or train in a new --workdir.')


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


def step_keys(rng, step):
  """(augmentation key, dropout key) of train step `step`: functions of the
  run's key and the step only, so a resumed run draws the same randomness."""
  aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, step))
  return aug_rng, dropout_rng


def model_inputs(batch, rng, *, config):
  """(images, dropout_rng) the model trains on: the batch's images,
  augmented when `config.augment`, and a dropout key, both drawn from `rng`."""
  aug_rng, dropout_rng = jax.random.split(rng)
  images = batch['image']
  if config.augment:
    images = augment.augment_batch(aug_rng, images, config.aug)
  return images, dropout_rng


def augment_step(batch, rng, step, *, config):
  """`batch` with its images augmented as train step `step` trains on them."""
  images = augment.augment_batch(step_keys(rng, step)[0], batch['image'],
                                 config.aug)
  return {**batch, 'image': images}


def train_step(state: TrainState, batch, rng, *, model):
  """One Nadam step on a global batch of (already augmented) images; returns
  (state, Metrics). Dropout uses `step_keys(rng, state.step)`."""
  dropout_rng = step_keys(rng, state.step)[1]

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, correct = per_example_metrics(logits, batch['label'])
    return loss.mean(), (updates['batch_stats'], loss, correct)

  grads, (batch_stats, loss, correct) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, Metrics.single_from_model_output(loss=loss, accuracy=correct)


def eval_step(variables, batch, *, model):
  """Masked loss/accuracy sums of a padded global batch (inference mode)."""
  logits = model.apply(variables, batch['image'], train=False)
  loss, correct = per_example_metrics(logits, batch['label'])
  return Metrics.single_from_model_output(loss=loss, accuracy=correct,
                                          mask=batch['mask'])


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
  augment_fn = jax.jit(functools.partial(augment_step, config=config),
                       in_shardings=(data, replicated, replicated),
                       out_shardings=data)

  def step(state, batch, rng):
    return train_fn(state, augment_fn(batch, rng, state.step), rng)
  return step


def make_eval_step(model, mesh) -> Callable:
  """`eval_step` jitted for `mesh`: (variables, batch) -> Metrics."""
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


def make_precise_bn(config, model, mesh) -> Callable:
  """(variables, builder, epoch) -> BatchNorm statistics recomputed on epoch
  `epoch`'s first `config.precise_bn_batches` training batches, as the train
  step sees them (see `gender_jax.precise_bn`)."""
  stats_step = precise_bn.make_stats_step(
      model, functools.partial(model_inputs, config=config), mesh)
  rng = jax.jit(lambda: jax.random.key(config.seed + 1),
                out_shardings=sharding.replicated(mesh))()

  def batch_stats(variables, builder, epoch: int):
    batches = input_pipeline.train_iterator(config, builder, mesh, epoch)
    return precise_bn.recompute(stats_step, variables, batches, rng, epoch,
                                config.precise_bn_batches)
  return batch_stats


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
# The loop.


@dataclasses.dataclass
class LoopState:
  """The epoch loop's bookkeeping, checkpointed as JSON with each train state.

  `epoch` is the next epoch to run (0-based) and `epoch_step` the batches of
  it already trained (a mid-epoch checkpoint). `history` holds one record per
  finished epoch (epoch 0: the `init_baseline` evaluation); `best` is the
  meta of the best model so far.
  """
  plateau: callbacks.Plateau
  early_stopping: callbacks.EarlyStopping = dataclasses.field(
      default_factory=callbacks.EarlyStopping)
  epoch: int = 0
  epoch_step: int = 0
  best: Optional[Dict[str, Any]] = None
  stopped_early: bool = False
  history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  train_seconds: float = 0.0

  def to_json(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Dict[str, Any], learning_rate: float) -> 'LoopState':
    """Reads `to_json` output, or the untyped dict that workdirs of earlier
    versions hold (an optax plateau scale, flax-style early-stopping keys),
    so their runs resume. `learning_rate`: the config's, for the old scale."""
    data = dict(data)
    plateau, stopping = data.pop('plateau'), data.pop('early_stopping')
    if 'scale' in plateau:
      plateau = {'learning_rate': callbacks.Plateau.start(
                     learning_rate * plateau['scale']).learning_rate,
                 'best': plateau['best_value'],
                 'wait': plateau['plateau_count']}
    if 'best_metric' in stopping:
      stopping = {'best': stopping['best_metric'],
                  'wait': stopping['patience_count'],
                  'epochs': len(data.get('history', []))}
    return cls(plateau=callbacks.Plateau(**plateau),
               early_stopping=callbacks.EarlyStopping(**stopping), **data)


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


class _Run:
  """One training run in a workdir: its data, jitted steps and writers."""

  def __init__(self, config, workdir, builder, mesh, checkpointer, writer):
    self.config, self.workdir, self.builder = config, workdir, builder
    self.mesh, self.checkpointer, self.writer = mesh, checkpointer, writer
    self.model = models.create_model(config)
    self.steps_per_epoch = input_pipeline.train_steps_per_epoch(config,
                                                                builder)
    self.train_fn = make_train_step(config, self.model, mesh)
    self.eval_fn = make_eval_step(self.model, mesh)
    self.rng = jax.jit(lambda: jax.random.key(config.seed),
                       out_shardings=sharding.replicated(mesh))()
    self.precise_bn = (make_precise_bn(config, self.model, mesh)
                       if config.precise_bn_batches else None)

  def start(self):
    """(state, loop): resumed from the latest checkpoint, or fresh."""
    lr = self.config.learning_rate
    restored = self.checkpointer.restore_latest(
        abstract_state(self.config, self.model, self.mesh),
        check=lambda loop: LoopState.from_json(loop, lr))
    if restored is not None:
      state = restored[0]
      loop = LoopState.from_json(restored[1], lr)
      logging.info('Resuming from %s at step %d (epoch %d, batch %d).',
                   self.workdir, int(state.step), loop.epoch + 1,
                   loop.epoch_step)
      return state, loop
    state = init_state(self.config, self.model, self.mesh)
    loop = LoopState(plateau=callbacks.Plateau.start(
        self.config.learning_rate))
    if self.config.init_from and self.config.init_baseline:
      state = self.validate(state, loop, epoch=0, train_values=None,
                            epoch_start=time.time())
    return state, loop

  def validate(self, state, loop: LoopState, epoch: int,
               train_values: Optional[Dict[str, float]],
               epoch_start: float) -> TrainState:
    """Ends epoch `epoch` (1-based; 0 = the baseline before training): precise
    BN, validation, the Keras rules, best and latest checkpoints, logs.
    Updates `loop` in place; returns the state (new BatchNorm statistics)."""
    config, step = self.config, int(state.step)
    train_seconds = time.time() - epoch_start
    if self.precise_bn is not None:
      state = state.replace(batch_stats=self.precise_bn(
          state.variables(), self.builder, max(epoch - 1, 0)))
    val = evaluate(self.eval_fn, state.variables(), config, self.builder,
                   self.mesh, config.eval_split)
    _check_finite({'val_loss': val['loss']}, 'validation loss', step,
                  self.checkpointer, self.workdir)
    lr = loop.plateau.learning_rate
    if epoch > 0:
      loop.plateau = callbacks.update_plateau(config, loop.plateau,
                                              val['loss'])
    loop.early_stopping, improved, stop = callbacks.update_early_stopping(
        config, loop.early_stopping, val['accuracy'])
    record = {'epoch': epoch, 'step': step, 'learning_rate': lr,
              'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
              'epoch_seconds': time.time() - epoch_start}
    if train_values is not None:
      trained = self.steps_per_epoch - loop.epoch_step
      record.update(train_loss=train_values['loss'],
                    train_accuracy=train_values['accuracy'],
                    images_per_sec=trained * config.batch_size / train_seconds,
                    train_seconds=train_seconds)
    if improved:
      loop.best = {'epoch': epoch, 'step': step,
                   'val_accuracy': val['accuracy'], 'val_loss': val['loss'],
                   'init_from': config.init_from}
      self.checkpointer.save_best(step, state.variables(), loop.best)
    loop.epoch, loop.epoch_step = max(epoch, loop.epoch), 0
    loop.stopped_early = bool(stop)
    loop.history = loop.history + [record]
    loop.train_seconds += record['epoch_seconds']
    self.checkpointer.save_latest(step, state, loop.to_json())
    self._log_epoch(record, improved, stop)
    return state

  def _log_epoch(self, record, improved: bool, stop: bool) -> None:
    config, epoch = self.config, record['epoch']
    if epoch == 0:
      logging.info('Epoch 0 (the model from %s, before any step): val_loss '
                   '%.4f val_acc %.4f | baseline', config.init_from,
                   record['val_loss'], record['val_accuracy'])
    else:
      logging.info(
          'Epoch %d/%d: loss %.4f acc %.4f | val_loss %.4f val_acc %.4f | '
          'lr %g | %.0f images/s%s%s', epoch, config.num_epochs,
          record['train_loss'], record['train_accuracy'], record['val_loss'],
          record['val_accuracy'], record['learning_rate'],
          record['images_per_sec'], ' | best' if improved else '',
          ' | early stop' if stop else '')
    scalars = {'epoch': epoch, 'val_loss': record['val_loss'],
               'val_accuracy': record['val_accuracy'],
               'learning_rate': record['learning_rate']}
    if 'train_loss' in record:
      scalars.update(epoch_train_loss=record['train_loss'],
                     epoch_train_accuracy=record['train_accuracy'],
                     epoch_images_per_sec=record['images_per_sec'])
    self.writer.write_scalars(record['step'], scalars)
    self.writer.flush()

  def train_epoch(self, state, loop: LoopState, hooks) -> TrainState:
    """Trains epoch `loop.epoch` from batch `loop.epoch_step`, then validates."""
    config, epoch = self.config, loop.epoch
    lr = loop.plateau.learning_rate
    state = set_learning_rate(state, lr, self.mesh)
    epoch_metrics = window = None
    epoch_start = window_start = time.time()
    window_steps = 0
    step = int(state.step)
    batches = input_pipeline.train_iterator(config, self.builder, self.mesh,
                                            epoch, loop.epoch_step)
    for epoch_step, batch in enumerate(batches, start=loop.epoch_step + 1):
      state, update = self.train_fn(state, batch, self.rng)
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
        _check_finite(values, 'training loss', step, self.checkpointer,
                      self.workdir)
        now = time.time()
        values['images_per_sec'] = (window_steps * config.batch_size
                                    / (now - window_start))
        values['learning_rate'] = lr
        self.writer.write_scalars(step, values)
        window, window_steps, window_start = None, 0, now
      if (config.checkpoint_every_steps
          and step % config.checkpoint_every_steps == 0
          and epoch_step < self.steps_per_epoch):
        values = {k: float(v) for k, v in epoch_metrics.compute().items()}
        _check_finite(values, 'training loss', step, self.checkpointer,
                      self.workdir)
        self.checkpointer.save_latest(step, state, dataclasses.replace(
            loop, epoch_step=epoch_step).to_json())
    if epoch_metrics is None:
      raise TrainingError(f'epoch {epoch + 1} yielded no training batches.')
    train_values = {k: float(v) for k, v in epoch_metrics.compute().items()}
    _check_finite(train_values, 'training loss', step, self.checkpointer,
                  self.workdir)
    return self.validate(state, loop, epoch + 1, train_values, epoch_start)

  def final_evaluation(self, loop: LoopState) -> Dict[str, Any]:
    """Evaluates the best model on validation and (if present) test."""
    if loop.best is None:
      raise TrainingError(f'{self.workdir} has no best model: no epoch '
                          'finished.')
    if loop.best['epoch'] == 0:
      logging.warning(
          'No epoch of this fine-tune beat its starting point (epoch 0, '
          'val_accuracy %.4f, from %s): best/ holds that starting model%s.',
          loop.best['val_accuracy'], self.config.init_from,
          ' (its weights, with BatchNorm statistics recomputed by precise BN)'
          if self.config.precise_bn_batches else '')
    variables, meta = checkpointing.restore_best(
        self.workdir, self.config, sharding=sharding.replicated(self.mesh))
    results = {}
    for split in (self.config.eval_split, 'test'):
      if split == 'test' and not ('test' in self.builder.info.splits or
                                  dataset.source_splits(self.builder, 'test')):
        continue
      results[split] = evaluate(self.eval_fn, variables, self.config,
                                self.builder, self.mesh, split)
      logging.info('Best model (epoch %d) on %s: %s', meta['epoch'], split,
                   results[split])
    return {
        'best_epoch': meta['epoch'],
        'best_val_accuracy': meta['val_accuracy'],
        'best_step': meta['step'],
        'epochs_run': loop.epoch,
        'stopped_early': loop.stopped_early,
        'train_seconds': round(loop.train_seconds, 1),
        'init_from': self.config.init_from,
        'final_evaluation': results,
        'history': loop.history,
    }

  def run(self) -> Dict[str, Any]:
    """The epoch loop; returns the summary of `final_evaluation` (and the
    calibration, with config.calibrate)."""
    state, loop = self.start()
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.config.num_epochs * self.steps_per_epoch,
        writer=self.writer)
    while loop.epoch < self.config.num_epochs and not loop.stopped_early:
      state = self.train_epoch(state, loop, [report_progress])
    summary = self.final_evaluation(loop)
    if self.config.calibrate:
      summary['calibration'] = calibration.calibrate_workdir(
          self.workdir, self.config.data_dir, self.config.eval_split,
          mesh=self.mesh)
      logging.info('Calibrated p(male): %s',
                   calibration.describe(summary['calibration']))
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir`, then evaluates the best model.

  Everything a user can get wrong (config values, dataset, batch size, the
  workdir's or `init_from`'s model) is checked before the workdir is touched
  and raised as `errors.UserError`; a second process on the same workdir stops
  with `locking.LockedError`. `config.json` is written with the run's first
  checkpoint. Returns the summary also written to `<workdir>/results.json`.
  """
  start_time = time.time()
  sharding.maybe_initialize_distributed(config)
  config_lib.validate(config)
  builder = dataset.load_builder(config.data_dir, config.dataset)
  stored = input_pipeline.stored_image_size(builder)
  input_pipeline.train_steps_per_epoch(config, builder)
  input_pipeline.eval_steps(config, builder, config.eval_split)
  if config.init_from:
    _check_init_from(config)
  _check_resume(config, workdir)
  mesh = sharding.make_mesh()
  with _workdir_lock(workdir):
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    checkpointer = checkpointing.Checkpointer(workdir, config)
    try:
      summary = _Run(config, workdir, builder, mesh, checkpointer,
                     writer).run()
      summary['total_seconds'] = round(time.time() - start_time, 1)
      summary['image_size'] = list(config.image_size)
      summary['stored_image_size'] = list(stored)
      summary['devices'] = jax.device_count()
      summary['processes'] = jax.process_count()
      if jax.process_index() == 0:
        fileio.write_json(os.path.join(workdir, RESULTS_FILE), summary)
      writer.write_scalars(summary['best_step'], {
          f'final/{split}_{k}': v
          for split, r in summary['final_evaluation'].items()
          for k, v in r.items() if k != 'count'})
    finally:
      writer.flush()
      checkpointer.close()
  return summary


def _workdir_lock(workdir: str):
  """Host 0 holds `<workdir>/lock` for the run; other hosts join its run."""
  if jax.process_index() > 0:
    return contextlib.nullcontext()
  return locking.hold(os.path.join(workdir, LOCK_FILE), f'workdir {workdir}')
