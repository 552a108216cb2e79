"""gender_jax.callbacks against keras.callbacks themselves, epoch by epoch."""

import json

import numpy as np
import pytest

from gender_jax import callbacks
from gender_jax import config_lib
from conftest import CONFIGS


def _keras_run(config, val_losses, val_accs):
  """Learning rate used per epoch, best epoch and stop epoch, from Keras'
  ReduceLROnPlateau and EarlyStopping(restore_best_weights) on a toy model."""
  keras = pytest.importorskip('keras')
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.Nadam(config.learning_rate),
                loss='mse')
  plateau = keras.callbacks.ReduceLROnPlateau(
      monitor='val_loss', factor=config.plateau_factor,
      patience=config.plateau_patience, min_delta=config.plateau_min_delta,
      min_lr=config.min_learning_rate)
  stopping = keras.callbacks.EarlyStopping(
      monitor='val_accuracy', mode='max',
      min_delta=config.early_stopping_min_delta,
      patience=config.early_stopping_patience, restore_best_weights=True)
  for cb in (plateau, stopping):
    cb.set_model(model)
    cb.on_train_begin()
  lrs, stop = [], None
  for epoch, (loss, acc) in enumerate(zip(val_losses, val_accs)):
    lrs.append(float(np.asarray(model.optimizer.learning_rate)))
    logs = {'val_loss': float(loss), 'val_accuracy': float(acc)}
    for cb in (plateau, stopping):
      cb.on_epoch_end(epoch, dict(logs))
    if model.stop_training:
      stop = epoch
      break
  return lrs, stopping.best_epoch, stop


def _our_run(config, val_losses, val_accs):
  plateau = callbacks.Plateau.start(config.learning_rate)
  stopping = callbacks.EarlyStopping()
  lrs, best, stop = [], None, None
  for epoch, (loss, acc) in enumerate(zip(val_losses, val_accs)):
    lrs.append(plateau.learning_rate)
    plateau = callbacks.update_plateau(config, plateau, loss)
    stopping, improved, stopped = callbacks.update_early_stopping(
        config, stopping, acc)
    # Through JSON, as checkpointed.
    plateau = callbacks.Plateau(**json.loads(json.dumps(vars(plateau))))
    stopping = callbacks.EarlyStopping(**json.loads(json.dumps(vars(stopping))))
    if improved:
      best = epoch
    if stopped:
      stop = epoch
      break
  return lrs, best, stop


def _sequences(seed, n=14):
  """Validation curves on a 3,000-image split: accuracies move by 0-4 images
  (3 images = min_delta exactly), losses by multiples of ~min_delta."""
  rng = np.random.default_rng(seed)
  accs = (2700 + np.cumsum(rng.integers(-3, 5, n))) / 3000
  losses = 0.3 + np.cumsum(rng.choice([-2e-4, -1e-4, -5e-5, 0, 1e-4, 3e-3],
                                      n))
  return losses.tolist(), accs.tolist()


@pytest.mark.parametrize('seed', range(8))
@pytest.mark.parametrize('stage', ['stage1.py', 'stage2.py'])
def test_rules_match_keras_callbacks(seed, stage):
  config = config_lib.load_sibling(CONFIGS, stage)
  losses, accs = _sequences(seed)
  assert _our_run(config, losses, accs) == _keras_run(config, losses, accs)


@pytest.mark.parametrize('losses,accs', [
    ([0.5, 0.4, 0.40005, 0.41, 0.39995, 0.3, 0.31, 0.32, 0.33, 0.34, 0.2],
     [0.6, 0.7, 0.7005, 0.701, 0.69, 0.7, 0.71, 0.7, 0.7, 0.7, 0.8]),
    ([0.7] * 8, [0.5] * 8),
    ([0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.901, 0.902, 0.903, 0.904]),
])
def test_hand_picked_edges_match_keras(losses, accs):
  config = config_lib.load_sibling(CONFIGS, 'stage1.py')
  config.plateau_patience = 2
  assert _our_run(config, losses, accs) == _keras_run(config, losses, accs)
