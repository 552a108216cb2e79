"""Keras' ReduceLROnPlateau and EarlyStopping, as once-per-epoch host rules.

The original trains with `ReduceLROnPlateau(monitor='val_loss', factor,
patience, min_delta, min_lr)` and `EarlyStopping(monitor='val_accuracy',
mode='max', min_delta, patience, restore_best_weights=True)`. Both decide once
per epoch on two host floats, so they are written out here as small
JSON-serialisable states (checkpointed with the loop) with Keras' exact
arithmetic, and tested against `keras.callbacks` themselves:

* Keras compares in float32 after shifting by `min_delta` in double
  (`ops.greater(current - min_delta, best)`), and holds the learning rate in a
  float32 variable. `flax.training.early_stopping` tests
  `best - metric > min_delta` in double and stops one epoch later;
  `optax.contrib.reduce_on_plateau` tracks a float32 scale with a relative and
  absolute tolerance inside the optimizer state. Both decide differently from
  Keras on the edge cases a 3,000-image validation set produces (a gain of
  exactly 3 images is `min_delta`), and the optax one would need its state
  threaded through the jitted step although it changes once per epoch.
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np


def _f32(x: float) -> float:
  return float(np.float32(x))


@dataclasses.dataclass
class Plateau:
  """ReduceLROnPlateau(mode='min', cooldown=0) state: the learning rate to
  use next, the best monitored value and the epochs without improvement."""
  learning_rate: float
  best: Optional[float] = None
  wait: int = 0

  @classmethod
  def start(cls, learning_rate: float) -> 'Plateau':
    """The state before the first epoch (the rate as Keras' float32)."""
    return cls(learning_rate=_f32(learning_rate))


def update_plateau(config, state: Plateau, val_loss: float) -> Plateau:
  """One epoch end of `keras.callbacks.ReduceLROnPlateau` on `val_loss`."""
  lr, best, wait = _f32(state.learning_rate), state.best, state.wait
  if best is None or _f32(val_loss + config.plateau_min_delta) < _f32(best):
    best, wait = float(val_loss), 0
  else:
    wait += 1
    if (wait >= config.plateau_patience
        and lr > np.float32(config.min_learning_rate)):
      lr = _f32(max(lr * config.plateau_factor, config.min_learning_rate))
      wait = 0
  return Plateau(learning_rate=lr, best=best, wait=wait)


@dataclasses.dataclass
class EarlyStopping:
  """EarlyStopping(mode='max', restore_best_weights=True) state: the best
  value, epochs since it, and how many epochs were seen (Keras never stops on
  the first)."""
  best: Optional[float] = None
  wait: int = 0
  epochs: int = 0


def update_early_stopping(config, state: EarlyStopping, val_accuracy: float
                          ) -> Tuple[EarlyStopping, bool, bool]:
  """One epoch end of `keras.callbacks.EarlyStopping` on `val_accuracy`.

  Returns (state, improved, stop): `improved` is when Keras saves the best
  weights, `stop` when it ends training.
  """
  best, wait = state.best, state.wait + 1
  improved = best is None or (
      _f32(val_accuracy - config.early_stopping_min_delta) > _f32(best))
  if improved:
    best, wait = float(val_accuracy), 0
  stop = (not improved and wait >= config.early_stopping_patience
          and state.epochs > 0)
  return EarlyStopping(best=best, wait=wait, epochs=state.epochs + 1), (
      improved), stop
