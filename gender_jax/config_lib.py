"""Config helpers: load sibling config files and validate values at start."""

import importlib.util
import os

import ml_collections

from gender_jax import augment
from gender_jax import errors
from gender_jax import models
from gender_jax import sources


class ConfigError(errors.UserError, ValueError):
  """A config field has a value it cannot take; the message names each."""


def load_sibling(anchor_file: str, name: str) -> ml_collections.ConfigDict:
  """Returns `get_config()` of the config file `name` next to `anchor_file`.

  Config files are loaded by path (as `ml_collections.config_flags` does), so
  `configs/` need not be an importable package.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(anchor_file)), name)
  spec = importlib.util.spec_from_file_location(
      f'gender_jax_config_{os.path.splitext(name)[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check(errors, ok, key, value, expectation):
  if not ok:
    errors.append(f'config.{key}={value!r}: expected {expectation}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every out-of-range field of `config`."""
  e = []
  size = tuple(config.image_size)
  _check(e, len(size) == 2 and all(isinstance(s, int) and s >= 16 for s in size),
         'image_size', config.image_size, '(height, width), both ints >= 16')
  for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'repeat',
              'shuffle_buffer', 'log_every_steps', 'plateau_patience',
              'early_stopping_patience'):
    _check(e, config[key] >= 1, key, config[key], 'an int >= 1')
  for key in ('steps_per_epoch', 'eval_steps'):
    _check(e, config[key] is None or config[key] >= 1, key, config[key],
           'None or an int >= 1')
  _check(e, config.checkpoint_every_steps >= 0, 'checkpoint_every_steps',
         config.checkpoint_every_steps, 'an int >= 0')
  _check(e, isinstance(config.precise_bn_batches, int)
         and config.precise_bn_batches >= 0, 'precise_bn_batches',
         config.precise_bn_batches, 'an int >= 0 (0: off)')
  for key in ('init_baseline', 'calibrate'):
    _check(e, isinstance(config[key], bool), key, config[key], 'True or False')
  for key in ('flatten_dropout_rate', 'dropout_rate'):
    _check(e, 0.0 <= config[key] < 1.0, key, config[key], 'a rate in [0, 1)')
  for key, allowed in (('model', models.MODELS),
                       ('compute_dtype', models.COMPUTE_DTYPES),
                       ('kernels', models.KERNELS)):
    _check(e, config[key] in allowed, key, config[key],
           ' or '.join(map(repr, allowed)))
  _check(e, config.learning_rate > 0, 'learning_rate', config.learning_rate,
         'a float > 0')
  _check(e, 0 < config.min_learning_rate <= config.learning_rate,
         'min_learning_rate', config.min_learning_rate,
         'a float in (0, learning_rate]')
  _check(e, 0 < config.plateau_factor < 1, 'plateau_factor',
         config.plateau_factor, 'a float in (0, 1)')
  for key in ('plateau_min_delta', 'early_stopping_min_delta'):
    _check(e, config[key] >= 0, key, config[key], 'a float >= 0')
  aug = config.aug
  for key in ('rotation', 'zoom', 'translation', 'brightness', 'contrast',
              'saturation'):
    _check(e, 0 <= aug[key] < 1, f'aug.{key}', aug[key], 'a factor in [0, 1)')
  _check(e, aug.resampling in augment.RESAMPLINGS, 'aug.resampling',
         aug.resampling, ' or '.join(map(repr, augment.RESAMPLINGS)))
  _check(e, 0.25 <= aug.scale_min <= aug.scale_max, 'aug.scale_min',
         aug.scale_min, 'a scale in [0.25, aug.scale_max]')
  _check(e, aug.scale_min <= aug.scale_max <= 4, 'aug.scale_max',
         aug.scale_max, 'a scale in [aug.scale_min, 4]')
  _check(e, 0 <= aug.hue <= 0.5, 'aug.hue', aug.hue,
         'a fraction of the hue circle in [0, 0.5]')
  for key in ('grayscale', 'blur', 'downscale'):
    _check(e, 0 <= aug[key] <= 1, f'aug.{key}', aug[key],
           'a probability in [0, 1]')
  _check(e, 0 < aug.blur_sigma_min <= aug.blur_sigma_max, 'aug.blur_sigma_min',
         aug.blur_sigma_min, 'pixels in (0, aug.blur_sigma_max]')
  _check(e, aug.blur_sigma_min <= aug.blur_sigma_max <= 5,
         'aug.blur_sigma_max', aug.blur_sigma_max,
         'pixels in [aug.blur_sigma_min, 5]')
  _check(e, 0.1 <= aug.downscale_min <= 1, 'aug.downscale_min',
         aug.downscale_min, 'a scale in [0.1, 1]')
  try:
    sources.parse_weights(config.source_weights)
  except ValueError as error:
    e.append(f'config.source_weights={config.source_weights!r}: {error}')
  if e:
    raise ConfigError('invalid configuration: ' + '; '.join(e))
