"""Temperature scaling: a calibrated p(male) = sigmoid(logit / T).

A trained classifier's p(male) is often over- or under-confident. One scalar
T > 0, fitted on the validation split by minimising the log loss, fixes most
of that without changing any prediction (T > 0 keeps the logit's sign).

`calibrate_workdir` fits T for a workdir's best model and stores it in
`<workdir>/calibration.json` with what it was fitted on and the split's ECE
and log loss before and after (`calibrate_logits`, which training calls with
its final evaluation's logits). Every place a probability leaves the model
(`predict.Predictor.from_workdir`, `evaluate`, `label`, `onnx_export`) reads
it with `read_temperature`; a workdir without the file is uncalibrated
(T = 1).
"""

import json
import math
import os
from typing import Optional

import jax
import numpy as np
from scipy import optimize

from gender_jax import errors
from gender_jax import fileio

CALIBRATION_FILE = 'calibration.json'
# Search range of T: beyond it p(male) is near 0/1 or 0.5 for every face.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


class CalibrationError(errors.UserError, ValueError):
  """A workdir's calibration.json cannot be used; the message says the fix."""


def fit_temperature(logits, labels) -> float:
  """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the mean binary
  log loss of sigmoid(logits / T) against labels (male = 1).

  The loss is convex in 1/T, so unimodal in log T: a bounded Brent search
  over log T finds it to ~1e-7 relative. All-zero logits give 1.0 (every T
  fits them equally), and so do logits that classify every example right:
  there the loss falls without end as T -> 0, and a split with no mistake
  says nothing about how sure the model should be.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  if z.shape != y.shape or z.ndim != 1 or not len(z):
    raise ValueError(f'logits {z.shape} and labels {y.shape} must be '
                     'equal-length, non-empty vectors')
  if not np.isfinite(z).all():
    raise ValueError('logits must be finite')
  if not z.any() or ((2.0 * y - 1.0) * z > 0).all():
    return 1.0

  def loss(log_t):
    scaled = z * math.exp(-log_t)
    return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

  result = optimize.minimize_scalar(
      loss, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
      method='bounded', options={'xatol': 1e-7})
  return float(math.exp(result.x))


def fit(labels, logits) -> dict:
  """The fitted temperature and the ECE and log loss before and after it."""
  from gender_jax import evaluate  # pylint: disable=g-import-not-at-top
  temperature = fit_temperature(logits, labels)
  logits = np.asarray(logits, np.float64)
  before = evaluate.calibration_errors(labels, logits)
  after = evaluate.calibration_errors(labels, logits / temperature)
  return {'temperature': temperature,
          'ece_before': before['ece'], 'ece_after': after['ece'],
          'log_loss_before': before['log_loss'],
          'log_loss_after': after['log_loss']}


def describe(result: dict) -> str:
  """One line: the temperature and the ECE/log loss before -> after."""
  return (f"temperature {result['temperature']:.4f} on {result['split']} "
          f"(step {result['step']}): ECE {result['ece_before']:.4f} -> "
          f"{result['ece_after']:.4f}, log loss "
          f"{result['log_loss_before']:.4f} -> {result['log_loss_after']:.4f}")


def calibration_path(workdir: str) -> str:
  """<workdir>/calibration.json."""
  return os.path.join(workdir, CALIBRATION_FILE)


def _fix(workdir: str) -> str:
  return f'rerun python scripts/calibrate.py --workdir={workdir}'


def write_calibration(workdir: str, result: dict) -> None:
  """Writes calibration.json atomically (host 0 only)."""
  if jax.process_index() == 0:
    fileio.write_json(calibration_path(workdir), result)


def read_calibration(workdir: str) -> Optional[dict]:
  """The workdir's calibration.json, or None if it has none.

  Raises:
    CalibrationError: the file is unreadable or its temperature is not a
      finite number > 0.
  """
  path = calibration_path(workdir)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    temperature = float(data['temperature'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CalibrationError(f'{path} is corrupt ({type(e).__name__}: {e}); '
                           f'{_fix(workdir)}.') from e
  if not math.isfinite(temperature) or temperature <= 0:
    raise CalibrationError(f'{path} holds temperature {temperature}, not a '
                           f'finite number > 0; {_fix(workdir)}.')
  return data


def read_temperature(workdir: str, step: Optional[int] = None) -> float:
  """The workdir's temperature; 1.0 (uncalibrated) without calibration.json.

  With `step` (the checkpoint step the caller loaded), a temperature fitted
  for another checkpoint (the best model changed since) is a
  CalibrationError rather than silently miscalibrated probabilities.
  """
  data = read_calibration(workdir)
  if data is None:
    return 1.0
  if step is not None and data.get('step') != step:
    raise CalibrationError(
        f'{calibration_path(workdir)} was fitted for checkpoint step '
        f"{data.get('step')}, but the model loaded is step {step}; "
        f'{_fix(workdir)}.')
  return float(data['temperature'])


def calibrate_logits(workdir: str, labels, logits, *, split: str,
                     checkpoint: str, step: int, data_dir: str) -> dict:
  """Fits the temperature of a workdir's model on its uncalibrated `logits`
  of `split` (of `checkpoint`, its `step`); host 0 writes calibration.json.

  Returns:
    The written dict: temperature, ece/log_loss before and after, and what
    it was fitted on (split, checkpoint, step, num_examples, data_dir).
  """
  result = fit(labels, logits)
  result.update(split=split, checkpoint=checkpoint, step=int(step),
                num_examples=len(labels), data_dir=data_dir)
  write_calibration(workdir, result)
  return result


def calibrate_workdir(workdir: str, data_dir: Optional[str] = None,
                      split: str = 'validation', checkpoint: str = 'best', *,
                      batch_size: Optional[int] = None, mesh=None) -> dict:
  """Fits the temperature of a workdir's model on `split`; writes it.

  The logits come from `evaluate`'s exact loop over the split (every example
  once, the evaluation's resizing). Every process runs it; host 0 writes
  calibration.json. Returns `calibrate_logits`' dict.
  """
  from gender_jax import evaluate  # pylint: disable=g-import-not-at-top
  from gender_jax import models  # pylint: disable=g-import-not-at-top
  from gender_jax import predict  # pylint: disable=g-import-not-at-top
  config, builder, mesh = evaluate.open_split(workdir, data_dir, split,
                                              batch_size, mesh)
  variables, meta = evaluate.load_variables(workdir, config, mesh, checkpoint)
  labels, logits, _ = evaluate.predict_split(
      config, builder, mesh,
      predict.make_predict_fn(models.create_model(config), mesh=mesh),
      variables, split, max_wrong=0)
  return calibrate_logits(workdir, labels, logits, split=split,
                          checkpoint=checkpoint, step=meta.get('step', 0),
                          data_dir=config.data_dir)
