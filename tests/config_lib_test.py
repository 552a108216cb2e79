"""Configs hold the original recipe; bad fields fail at start, naming the key."""

import os

import pytest

from gender_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')


def _load(name):
  return config_lib.load_sibling(os.path.join(CONFIGS, 'x'), name)


def test_stage_configs_hold_the_original_recipe():
  s1, s2 = _load('stage1.py'), _load('stage2.py')
  for c in (s1, s2):
    config_lib.validate(c)
    assert (c.batch_size, c.learning_rate, c.seed, c.shuffle_buffer) == (128, 1e-3, 42, 10_000)
    assert tuple(c.image_size) == (218, 178)
    assert (c.plateau_factor, c.plateau_min_delta, c.min_learning_rate) == (0.5, 1e-4, 5e-4)
    assert c.early_stopping_min_delta == 1e-3
  assert (s1.augment, s1.repeat, s1.dropout_rate, s1.num_epochs) == (True, 2, 0.0, 25)
  assert (s1.plateau_patience, s1.early_stopping_patience) == (3, 5)
  # The Keras factors; one resampling of the composed map by default.
  assert (s1.aug.flip, s1.aug.rotation, s1.aug.zoom, s1.aug.translation,
          s1.aug.brightness, s1.aug.resampling) == (True, 0.1, 0.01, 0.05, 0.5, 'single')
  # The original's stage 2 does not repeat the training set.
  assert (s2.augment, s2.repeat, s2.dropout_rate, s2.num_epochs) == (False, 1, 0.3, 10)
  assert (s2.plateau_patience, s2.early_stopping_patience) == (2, 3)
  # Our two additions: stage 2 only.
  assert (s1.init_baseline, s2.init_baseline) == (False, True)
  assert s2.precise_bn_batches > 0


def test_validate_names_every_bad_field():
  c = _load('default.py')
  c.batch_size = 0
  c.dropout_rate = 1.5
  c.image_size = (8, 178)
  c.precise_bn_batches = -1
  c.aug.resampling = 'bicubic'
  c.calibrate = None
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  for key in ('config.batch_size=0', 'config.dropout_rate=1.5', 'config.image_size',
              'config.precise_bn_batches=-1', "config.aug.resampling='bicubic'",
              'config.calibrate=None'):
    assert key in str(e.value)
  assert '\n' not in str(e.value)   # One line.


def test_robust_augmentation_defaults_are_off():
  c = _load('default.py')
  assert (c.aug.scale_min, c.aug.scale_max) == (1.0, 1.0)
  for op in ('contrast', 'saturation', 'hue', 'grayscale', 'blur', 'downscale'):
    assert c.aug[op] == 0.0, op


def test_robust_configs_load_and_validate():
  s1, s2 = _load('stage1.py'), _load('stage2.py')
  robust, robust2 = _load('robust.py'), _load('robust_stage2.py')
  for c in (robust, robust2):
    config_lib.validate(c)
    assert (c.train_split, c.eval_split) == ('train', 'validation')
    assert c.augment and c.aug.contrast > 0 and c.aug.downscale > 0
  # Stage 1's optimisation, stage 2's fine-tune.
  for key in ('learning_rate', 'repeat', 'num_epochs', 'plateau_patience',
              'early_stopping_patience', 'dropout_rate', 'init_baseline',
              'precise_bn_batches'):
    assert robust[key] == s1[key] and robust2[key] == s2[key], key
  assert robust.aug.scale_min < 1 < robust.aug.scale_max
  # Stage 2: stage 1's framing and photometric ops, no rotation/zoom/shift.
  assert (robust2.aug.rotation, robust2.aug.zoom,
          robust2.aug.translation) == (0, 0, 0)
  assert {op: robust2.aug[op] for op in (
      'scale_min', 'scale_max', 'contrast', 'saturation', 'hue', 'grayscale',
      'blur', 'downscale')} == {
          'scale_min': 0.8, 'scale_max': 1.25, 'contrast': 0.3,
          'saturation': 0.3, 'hue': 0.05, 'grayscale': 0.1, 'blur': 0.2,
          'downscale': 0.25}


def test_validate_names_every_bad_augmentation_field():
  c = _load('robust.py')
  bad = dict(contrast=1.0, saturation=-0.1, hue=0.6, grayscale=1.5, blur=-1.0,
             downscale=2.0, scale_min=0.1, scale_max=5.0, blur_sigma_min=0.0,
             blur_sigma_max=6.0, downscale_min=0.05)
  c.aug.update(bad)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  for key, value in bad.items():
    assert f'config.aug.{key}={value!r}' in str(e.value)
  assert '\n' not in str(e.value)
  c = _load('robust.py')
  c.aug.scale_min, c.aug.scale_max = 1.2, 0.9
  c.aug.blur_sigma_min, c.aug.blur_sigma_max = 2.0, 1.0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  for key in ('scale_min', 'scale_max', 'blur_sigma_min', 'blur_sigma_max'):
    assert f'config.aug.{key}=' in str(e.value)
