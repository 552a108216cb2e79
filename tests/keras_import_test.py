"""Keras models of the original architecture import into equal Flax models.

The Keras models come from `benchmarks/keras_reference.py` (the original's
builder, imported by path) with random weights and random BatchNorm
statistics; Flax's p(male) must equal Keras' to 1e-5.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest

from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import errors
from gender_jax import keras_import
from gender_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')
SMALL = (64, 48)


@pytest.fixture(name='reference', scope='module')
def _reference():
  """benchmarks/keras_reference.py, imported by path."""
  spec = importlib.util.spec_from_file_location(
      'keras_reference', os.path.join(REPO, 'benchmarks', 'keras_reference.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(name='default.py'):
  return config_lib.load_sibling(os.path.join(CONFIGS, 'x'), name)


def _output_layer(model):
  return [l for l in model.layers if isinstance(l, keras.layers.Dense)][-1]


def randomize(model, seed):
  """Random BatchNorm scale/offset/statistics, larger output weights."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
      layer.beta.assign(rng.normal(0, 0.3, n).astype(np.float32))
      layer.moving_mean.assign(rng.normal(0, 0.5, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.3, 2.0, n).astype(np.float32))
  output = _output_layer(model)
  output.kernel.assign(output.kernel * 4.0)
  return model


def keras_model(reference, image_size=SMALL, dropout_rate=0.0, seed=0):
  keras.utils.set_random_seed(seed)
  model = randomize(reference.build_keras_model(image_size, dropout_rate),
                    seed)
  center_output(model, _images(8, image_size, seed=seed + 100))
  return model


def _images(n, image_size, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, *image_size, 3)).astype(np.uint8)


def _flax_p(config, variables, images):
  model = models.create_model(config)
  return np.asarray(jax.nn.sigmoid(model.apply(variables, images,
                                               train=False)))


def _keras_p(model, images):
  return model.predict(images.astype(np.float32), verbose=0)[:, 0]


def center_output(model, images):
  """Shifts the output bias so that p(male) of `images` spreads around 0.5
  (a random model's are near 0 or 1, where equal p would prove little)."""
  p = _keras_p(model, images).astype(np.float64)
  logits = np.log(p) - np.log1p(-p)
  output = _output_layer(model)
  output.bias.assign(output.bias - np.float32(np.median(logits)))


def _assert_equal_outputs(config, variables, model, images):
  want = _keras_p(model, images)
  got = _flax_p(config, variables, images)
  assert np.abs(got - want).max() <= 1e-5
  assert want.std() > 0.02      # Not a saturated, trivial comparison.


@pytest.mark.parametrize('dropout_rate', [0.0, 0.3], ids=['stage1', 'stage2'])
def test_imported_variables_give_keras_outputs(reference, dropout_rate):
  model = keras_model(reference, dropout_rate=dropout_rate)
  variables, settings = keras_import.keras_variables(model)
  assert settings['image_size'] == SMALL
  assert settings['flatten_dropout_rate'] == 0.3
  assert settings['dropout_rate'] == dropout_rate
  config = _config()
  config.image_size = SMALL
  _assert_equal_outputs(config, variables, model, _images(32, SMALL))


def test_full_size_import(reference):
  size = (218, 178)
  model = keras_model(reference, size, seed=1)
  variables, _ = keras_import.keras_variables(model)
  assert sum(v.size for v in jax.tree.leaves(variables)) == 9_562_209
  _assert_equal_outputs(_config(), variables, model, _images(8, size, seed=1))


@pytest.mark.parametrize('suffix', ['.keras', '.h5'])
def test_import_writes_a_workdir(reference, tmp_path, suffix):
  model = keras_model(reference, dropout_rate=0.3, seed=2)
  path = str(tmp_path / f'model{suffix}')
  model.save(path)
  workdir = str(tmp_path / 'w')
  summary = keras_import.import_keras(path, workdir, _config())
  assert summary['model'] == 'cnn' and summary['num_params'] == 975_329
  config, _, variables, meta = checkpointing.load_model(workdir)
  assert tuple(config.image_size) == SMALL and config.dropout_rate == 0.3
  assert meta['step'] == 0
  assert meta['keras_layers']['Dense_1'] == _output_layer(model).name
  _assert_equal_outputs(config, variables, model, _images(16, SMALL, seed=3))
  # Stage 2 can start from it (steps.init_state restores it this way).
  stage2 = _config('stage2.py')
  stage2.image_size = SMALL
  restored, _ = checkpointing.restore_best(workdir, stage2)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  with pytest.raises(errors.UserError, match='already holds a run'):
    keras_import.import_keras(path, workdir, _config())


def test_tiny_widths_and_inference_no_ops(reference):
  """Augmentation inside the model is skipped; tiny widths map to 'tiny'."""
  inputs = keras.Input((*SMALL, 3))
  x = reference.build_augmentation()(inputs)
  x = keras.layers.Rescaling(1 / 255)(x)
  for filters, kernel in zip((4, 8, 8, 8), reference.KERNEL_SIZES):
    x = keras.layers.Conv2D(filters, kernel, padding='same', use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation('swish')(x)
    x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, use_bias=False)(x)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.Activation('swish')(x)
  x = keras.layers.Dense(1)(x)
  model = randomize(keras.Model(inputs, keras.layers.Activation('sigmoid')(x)),
                    seed=4)
  center_output(model, _images(8, SMALL))
  variables, settings = keras_import.keras_variables(model)
  assert settings['flatten_dropout_rate'] == 0.0
  config = _config()
  config.image_size = SMALL
  config.flatten_dropout_rate = 0.0
  assert keras_import.choose_model(config, variables,
                                   settings['sources']) == 'tiny'
  config.model = 'tiny'
  _assert_equal_outputs(config, variables, model, _images(16, SMALL, seed=4))


def _modified(reference, change):
  """The original at SMALL with one layer replaced: change(i, layer) returns
  the layer to use at position i (or None to drop it)."""
  original = reference.build_keras_model(SMALL)
  x = inputs = keras.Input((*SMALL, 3))
  for i, layer in enumerate(original.layers[1:], 1):
    layer = change(i, layer.__class__.from_config(layer.get_config()))
    if layer is not None:
      x = layer(x)
  return keras.Model(inputs, x)


def _bias_conv(i, layer):
  if i == 6:
    return keras.layers.Conv2D(64, 3, padding='same', name='biased')
  return layer


def _wide_dense(i, layer):
  if isinstance(layer, keras.layers.Dense) and layer.units == 512:
    return keras.layers.Dense(256, use_bias=False, name='wide')
  return layer


def _biased_dense(i, layer):
  if isinstance(layer, keras.layers.Dense) and layer.units == 512:
    return keras.layers.Dense(512, use_bias=True, name='biased_dense')
  return layer


def _no_rescale(i, layer):
  return None if i == 1 else layer


def _avg_pool(i, layer):
  return keras.layers.AveragePooling2D(2, name='avg') if i == 5 else layer


@pytest.mark.parametrize('change,message', [
    (_bias_conv, "'biased' \\(Conv2D\\) has use_bias=True"),
    (_wide_dense, "'wide' holds kernel of shape \\(1536, 256\\)"),
    (_biased_dense, "'biased_dense' \\(Dense\\) has use_bias=True"),
    (_no_rescale, "\\(Conv2D\\) stands where Rescaling\\(1/255\\) is"),
    (_avg_pool, "'avg' \\(AveragePooling2D\\) is not part of the "),
])
def test_refuses_other_architectures(reference, change, message):
  model = _modified(reference, change)
  with pytest.raises(errors.UserError, match=message):
    variables, settings = keras_import.keras_variables(model)
    config = _config()
    config.image_size = SMALL
    keras_import.choose_model(config, variables, settings['sources'])


def test_refuses_variable_input_size():
  inputs = keras.Input((None, None, 3))
  model = keras.Model(inputs, keras.layers.Rescaling(1 / 255)(inputs))
  with pytest.raises(errors.UserError, match='fixed height and width'):
    keras_import.image_size(model)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_imports_and_fails_in_one_line(reference, tmp_path):
  path = str(tmp_path / 'm.h5')
  keras_model(reference, seed=5).save(path)
  script = os.path.join(REPO, 'scripts', 'import_keras.py')
  env = {**os.environ, 'GENDER_JAX_NO_REEXEC': '1'}
  ok = subprocess.run([sys.executable, script, f'--keras_model={path}',
                       f'--workdir={tmp_path / "w"}'], capture_output=True,
                      text=True, env=env, check=False)
  assert ok.returncode == 0, ok.stderr
  assert '"dropout_rate": 0.0' in ok.stdout
  bad = subprocess.run([sys.executable, script,
                        f'--keras_model={tmp_path / "missing.keras"}',
                        f'--workdir={tmp_path / "w2"}'], capture_output=True,
                       text=True, env=env, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith(
      'import_keras.py: error:')
  assert 'does not exist' in bad.stderr


def test_failed_import_leaves_nothing_that_blocks_its_rerun(
    reference, tmp_path, monkeypatch):
  model = keras_model(reference, dropout_rate=0.3, seed=2)
  workdir = str(tmp_path / 'w')

  def disk_full(self, step, variables, meta):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(checkpointing.Checkpointer, 'save_best', disk_full)
  with pytest.raises(OSError):
    keras_import.import_keras('model.keras', workdir, _config(), model=model)
  assert os.listdir(tmp_path) == []         # No half workdir, no temporary.
  monkeypatch.undo()
  summary = keras_import.import_keras('model.keras', workdir, _config(),
                                      model=model)
  assert summary['num_params'] == 975_329
  assert sorted(os.listdir(workdir)) == ['best', 'config.json']
