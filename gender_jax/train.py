"""The Keras-style epoch loop: train, validate, checkpoint, resume, report.

`train_and_evaluate` follows the original Keras `fit` recipe with the steps
of `gender_jax.steps`: after each epoch it evaluates the validation split,
applies Keras' ReduceLROnPlateau (val_loss) and EarlyStopping (val_accuracy,
`gender_jax.callbacks`) and saves the best model exactly when EarlyStopping
reports an improvement (`restore_best_weights`). Config additions: precise
BN statistics before each validation (`precise_bn_batches`), and a
fine-tune's starting model validated as epoch 0 and kept as the best model
unless an epoch beats it (`init_baseline`, the one departure from Keras).

A run restarted in the same workdir resumes from its latest checkpoint, mid-
epoch too, as if it had never stopped. At the end the best model is evaluated
on the validation and (if present) test splits into `<workdir>/results.json`
and, with `config.calibrate`, its temperature is fitted on those validation
logits (`<workdir>/calibration.json`). Only host 0 writes files; it holds the
workdir's lock for the whole run.
"""

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Dict, List, Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from gender_jax import calibration
from gender_jax import callbacks
from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import dataset
from gender_jax import errors
from gender_jax import evaluate
from gender_jax import fileio
from gender_jax import input_pipeline
from gender_jax import locking
from gender_jax import models
from gender_jax import predict
from gender_jax import sharding
from gender_jax import steps

RESULTS_FILE = 'results.json'
LOCK_FILE = 'lock'


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


def _check_resume(config, workdir: str) -> None:
  """A workdir with checkpoints only resumes with the same architecture."""
  if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    return
  mismatch = steps.architecture_mismatch(
      config, checkpointing.read_config(workdir),
      os.path.join(workdir, 'config.json'))
  if mismatch:
    raise errors.UserError(
        f'--workdir={workdir} holds a run of another model ({mismatch}); '
        'resume it with its own settings or train in a new --workdir.')


def validation_metrics(labels, logits) -> Dict[str, Any]:
  """{'loss', 'accuracy', 'count'} of a split's logits: mean binary
  cross-entropy and the fraction right (male when logit >= 0).

  Both are float32 values, as Keras logs them for its callbacks (early
  stopping's min_delta compares them at that precision).
  """
  correct = (np.asarray(logits) >= 0) == (np.asarray(labels) == 1)
  return {'loss': float(np.float32(evaluate.log_loss(labels, logits))),
          'accuracy': float(np.float32(correct.mean())),
          'count': len(correct)}


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
  def from_json(cls, data: Dict[str, Any]) -> 'LoopState':
    """Reads `to_json` output; loop metadata of another format is an
    `checkpointing.IncompatibleError` (the run does not resume here)."""
    data = dict(data)
    plateau, stopping = data.pop('plateau'), data.pop('early_stopping')
    if 'scale' in plateau or 'best_metric' in stopping:
      raise checkpointing.IncompatibleError(
          'loop metadata of an older gender_jax version; train in a new '
          '--workdir (or finish this run with that version).')
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
    self.train_fn = steps.make_train_step(config, self.model, mesh)
    self.predict_fn = predict.make_predict_fn(self.model, mesh=mesh)
    self.rng = jax.jit(lambda: jax.random.key(config.seed),
                       out_shardings=sharding.replicated(mesh))()
    self.precise_bn = (steps.make_precise_bn(config, self.model, mesh)
                       if config.precise_bn_batches else None)

  def start(self):
    """(state, loop): resumed from the latest checkpoint, or fresh."""
    restored = self.checkpointer.restore_latest(
        checkpointing.abstract_state(self.config, steps.create_train_state,
                                     sharding.replicated(self.mesh)),
        check=LoopState.from_json)
    if restored is not None:
      state, loop = restored[0], LoopState.from_json(restored[1])
      logging.info('Resuming from %s at step %d (epoch %d, batch %d).',
                   self.workdir, int(state.step), loop.epoch + 1,
                   loop.epoch_step)
      return state, loop
    state = steps.init_state(self.config, self.model, self.mesh)
    loop = LoopState(plateau=callbacks.Plateau.start(
        self.config.learning_rate))
    if self.config.init_from and self.config.init_baseline:
      state = self.validate(state, loop, epoch=0, train_values=None,
                            epoch_start=time.time())
    return state, loop

  def validate(self, state, loop: LoopState, epoch: int,
               train_values: Optional[Dict[str, float]],
               epoch_start: float) -> steps.TrainState:
    """Ends epoch `epoch` (1-based; 0 = the baseline before training): precise
    BN, validation, the Keras rules, best and latest checkpoints, logs.
    Updates `loop` in place; returns the state (new BatchNorm statistics)."""
    config, step = self.config, int(state.step)
    train_seconds = time.time() - epoch_start
    if self.precise_bn is not None:
      state = state.replace(batch_stats=self.precise_bn(
          state.variables(), self.builder, max(epoch - 1, 0)))
    val = validation_metrics(*self.split_logits(state.variables(),
                                                config.eval_split))
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

  def split_logits(self, variables, split: str):
    """(labels, logits) of `split` (or its eval_steps cap)."""
    labels, logits, _ = evaluate.predict_split(
        self.config, self.builder, self.mesh, self.predict_fn, variables,
        split, max_wrong=0)
    return labels, logits

  def train_epoch(self, state, loop: LoopState, hooks) -> steps.TrainState:
    """Trains epoch `loop.epoch` from batch `loop.epoch_step`, then validates."""
    config, epoch = self.config, loop.epoch
    lr = loop.plateau.learning_rate
    state = steps.set_learning_rate(state, lr, self.mesh)
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
    """The summary: the best model evaluated on validation and (if present)
    test, and with config.calibrate its temperature, fitted on those
    validation logits."""
    config = self.config
    if loop.best is None:
      raise TrainingError(f'{self.workdir} has no best model: no epoch '
                          'finished.')
    if loop.best['epoch'] == 0:
      logging.warning(
          'No epoch of this fine-tune beat its starting point (epoch 0, '
          'val_accuracy %.4f, from %s): best/ holds that starting model%s.',
          loop.best['val_accuracy'], config.init_from,
          ' (its weights, with BatchNorm statistics recomputed by precise BN)'
          if config.precise_bn_batches else '')
    variables, meta = checkpointing.restore_best(
        self.workdir, config, sharding=sharding.replicated(self.mesh))
    results, outputs = {}, {}
    for split in (config.eval_split, 'test'):
      if split == 'test' and not ('test' in self.builder.info.splits or
                                  dataset.source_splits(self.builder, 'test')):
        continue
      outputs[split] = self.split_logits(variables, split)
      results[split] = validation_metrics(*outputs[split])
      logging.info('Best model (epoch %d) on %s: %s', meta['epoch'], split,
                   results[split])
    summary = {
        'best_epoch': meta['epoch'],
        'best_val_accuracy': meta['val_accuracy'],
        'best_step': meta['step'],
        'epochs_run': loop.epoch,
        'stopped_early': loop.stopped_early,
        'train_seconds': round(loop.train_seconds, 1),
        'init_from': config.init_from,
        'final_evaluation': results,
        'history': loop.history,
    }
    if config.calibrate:
      summary['calibration'] = calibration.calibrate_logits(
          self.workdir, *outputs[config.eval_split], split=config.eval_split,
          checkpoint='best', step=meta['step'], data_dir=config.data_dir)
      logging.info('Calibrated p(male): %s',
                   calibration.describe(summary['calibration']))
    return summary

  def run(self) -> Dict[str, Any]:
    """The epoch loop; returns the summary of `final_evaluation`."""
    state, loop = self.start()
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.config.num_epochs * self.steps_per_epoch,
        writer=self.writer)
    while loop.epoch < self.config.num_epochs and not loop.stopped_early:
      state = self.train_epoch(state, loop, [report_progress])
    return self.final_evaluation(loop)


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
    steps.check_init_from(config)
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
