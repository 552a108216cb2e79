"""Brings the original Keras model's trained weights into a gender_jax workdir.

The Keras model (``.keras`` or full-model ``.h5``) must be the original
architecture (`benchmarks/keras_reference.py` builds it): Rescaling(1/255),
four Conv2D (no bias, 'same') -> BatchNormalization -> swish ->
MaxPooling2D(2) blocks, Flatten, [Dropout], Dense (no bias),
BatchNormalization, swish, [Dropout], Dense(1, sigmoid). Layers are matched by
type and order, never by their auto-generated names; nested models are
walked into, and augmentation layers that are the identity at inference
(RandomFlip, ...) are skipped. Anything else is refused, naming the layer.

The layouts need no transposes: Keras' Conv2D kernel is HWIO and its Dense
kernel (in, out), as in flax, and a channels_last Flatten orders features
(H, W, C) row-major, like the model's reshape. BatchNormalization's gamma,
beta, moving_mean and moving_variance become params scale/bias and
batch_stats mean/var. The widths pick config.model ('cnn' or 'tiny'), the
input shape config.image_size and the Dropout layers the dropout rates; the
workdir then serves evaluation, labelling and stage-2 ``init_from`` like one
written by training.
"""

import math
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np

from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import errors
from gender_jax import models

KERAS_SUFFIXES = ('.keras', '.h5', '.hdf5')
# Keras layers that are the identity at inference: skipped.
INFERENCE_IDENTITY = ('RandomFlip', 'RandomRotation', 'RandomZoom',
                      'RandomTranslation', 'RandomBrightness', 'RandomContrast',
                      'GaussianNoise')
NUM_BLOCKS = 4

_DESCRIPTION = {
    'rescale': 'Rescaling(1/255)',
    'conv': 'Conv2D',
    'bn': 'BatchNormalization',
    'swish': 'a swish activation',
    'pool': 'MaxPooling2D(2)',
    'flatten': 'Flatten',
    'dropout': 'Dropout',
    'dense': 'Dense',
    'sigmoid': 'a sigmoid output activation',
}
# (role, optional) in order: the original architecture.
ARCHITECTURE = (
    (('rescale', False),) +
    (('conv', False), ('bn', False), ('swish', False), ('pool', False)) *
    NUM_BLOCKS +
    (('flatten', False), ('dropout', True), ('dense', False), ('bn', False),
     ('swish', False), ('dropout', True), ('dense', False), ('sigmoid', False)))


def _describe(layer) -> str:
  return f'layer {layer.name!r} ({type(layer).__name__})'


def _refuse(layer, problem: str):
  raise errors.UserError(
      f'{_describe(layer)} {problem}: this is not the original gender CNN '
      '(see benchmarks/keras_reference.py), which is the only architecture '
      'that can be imported.')


def _expect(layer, config: dict, key: str, allowed) -> None:
  value = config.get(key)
  value = tuple(value) if isinstance(value, list) else value
  if value not in allowed:
    _refuse(layer, f'has {key}={value!r}, expected {allowed[0]!r}')


def _activation_roles(layer, name: str) -> List[str]:
  if name == 'linear':
    return []
  if name in ('swish', 'silu'):
    return ['swish']
  if name == 'sigmoid':
    return ['sigmoid']
  _refuse(layer, f'has activation {name!r}')


def _roles(layer) -> List[str]:
  """The architecture roles one Keras layer plays, after checking its config."""
  kind = type(layer).__name__
  c = layer.get_config()
  if kind == 'Rescaling':
    if not (np.isclose(float(np.squeeze(c['scale'])), 1 / 255, rtol=1e-6) and
            float(np.squeeze(c['offset'])) == 0.0):
      _refuse(layer, f"scales by {c['scale']} + {c['offset']}, expected "
              '1/255 + 0 (the model takes 0..255 images)')
    return ['rescale']
  if kind == 'Conv2D':
    _expect(layer, c, 'padding', ('same',))
    _expect(layer, c, 'strides', ((1, 1),))
    _expect(layer, c, 'dilation_rate', ((1, 1),))
    _expect(layer, c, 'groups', (1, None))
    _expect(layer, c, 'use_bias', (False,))
    _expect(layer, c, 'data_format', ('channels_last', None))
    return ['conv'] + _activation_roles(layer, c['activation'])
  if kind == 'BatchNormalization':
    _expect(layer, c, 'axis', (-1, 3, (-1,), (3,)))
    _expect(layer, c, 'center', (True,))
    _expect(layer, c, 'scale', (True,))
    if not math.isclose(c['epsilon'], models.BN_EPSILON, rel_tol=1e-6):
      _refuse(layer, f"has epsilon={c['epsilon']}, expected "
              f'{models.BN_EPSILON}')
    return ['bn']
  if kind == 'Activation':
    return _activation_roles(layer, c['activation'])
  if kind == 'MaxPooling2D':
    _expect(layer, c, 'pool_size', ((2, 2),))
    _expect(layer, c, 'strides', ((2, 2), None))
    _expect(layer, c, 'padding', ('valid',))
    _expect(layer, c, 'data_format', ('channels_last', None))
    return ['pool']
  if kind == 'Flatten':
    _expect(layer, c, 'data_format', ('channels_last', None))
    return ['flatten']
  if kind == 'Dropout':
    return ['dropout']
  if kind == 'Dense':
    return ['dense'] + _activation_roles(layer, c['activation'])
  _refuse(layer, 'is not part of the architecture')


def _flat_layers(model) -> list:
  """Layers in order, nested models expanded, inputs and no-ops dropped."""
  out = []
  for layer in model.layers:
    kind = type(layer).__name__
    if kind == 'InputLayer' or kind in INFERENCE_IDENTITY:
      continue
    if hasattr(layer, 'layers'):
      out += _flat_layers(layer)
    else:
      out.append(layer)
  return out


def match_layers(model) -> List[Tuple[str, Any]]:
  """[(role, layer or None)] in `ARCHITECTURE` order; refuses a mismatch."""
  found = [(role, layer) for layer in _flat_layers(model)
           for role in _roles(layer)]
  matched, i = [], 0
  for role, optional in ARCHITECTURE:
    if i < len(found) and found[i][0] == role:
      matched.append(found[i])
      i += 1
    elif optional:
      matched.append((role, None))
    elif i < len(found):
      _refuse(found[i][1], f'stands where {_DESCRIPTION[role]} is expected')
    else:
      raise errors.UserError(
          f'The Keras model {model.name!r} ends before {_DESCRIPTION[role]}: '
          'this is not the original gender CNN (see '
          'benchmarks/keras_reference.py).')
  if i < len(found):
    _refuse(found[i][1], 'follows the output layer')
  return matched


def _array(variable) -> np.ndarray:
  return np.asarray(variable.numpy() if hasattr(variable, 'numpy')
                    else variable, np.float32)


def _bn(layer) -> Tuple[dict, dict]:
  return ({'scale': _array(layer.gamma), 'bias': _array(layer.beta)},
          {'mean': _array(layer.moving_mean),
           'var': _array(layer.moving_variance)})


def image_size(model) -> Tuple[int, int]:
  """(H, W) from the Keras model's input shape (None, H, W, 3)."""
  shape = model.input_shape
  if (not isinstance(shape, tuple) or len(shape) != 4 or shape[3] != 3 or
      not all(isinstance(s, int) for s in shape[1:3])):
    raise errors.UserError(
        f'The Keras model {model.name!r} takes input of shape {shape}; '
        'expected (None, height, width, 3) with a fixed height and width.')
  return shape[1], shape[2]


def keras_variables(model) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """({'params', 'batch_stats'} as flax's GenderCNN names them, settings).

  Settings: image_size, flatten_dropout_rate and dropout_rate (the rates of
  the Dropout layers after Flatten and before the output; 0 if absent).
  """
  matched = match_layers(model)
  layers = {}
  for role, layer in matched:
    layers.setdefault(role, []).append(layer)
  params, stats, sources = {}, {}, {}
  for i, (conv, bn) in enumerate(zip(layers['conv'], layers['bn'])):
    name = f'ConvBlock_{i}'
    scale_bias, mean_var = _bn(bn)
    params[name] = {'Conv_0': {'kernel': _array(conv.kernel)},
                    'BatchNorm_0': scale_bias}
    stats[name] = {'BatchNorm_0': mean_var}
    sources[f'{name}/Conv_0'], sources[f'{name}/BatchNorm_0'] = conv, bn
  hidden, output = layers['dense']
  if hidden.use_bias:
    _refuse(hidden, 'has use_bias=True, expected False')
  if not output.use_bias:
    _refuse(output, 'has use_bias=False, expected True')
  params['Dense_0'] = {'kernel': _array(hidden.kernel)}
  params['BatchNorm_0'], stats['BatchNorm_0'] = _bn(layers['bn'][-1])
  params['Dense_1'] = {'kernel': _array(output.kernel),
                       'bias': _array(output.bias)}
  sources.update({'Dense_0': hidden, 'BatchNorm_0': layers['bn'][-1],
                  'Dense_1': output})
  flatten_dropout, dropout = layers['dropout']
  settings = {
      'image_size': image_size(model),
      'flatten_dropout_rate': float(flatten_dropout.rate) if flatten_dropout
                              else 0.0,
      'dropout_rate': float(dropout.rate) if dropout else 0.0,
      'sources': {k: v.name for k, v in sources.items()},
  }
  return {'params': params, 'batch_stats': stats}, settings


def _shapes(tree) -> Dict[str, tuple]:
  return {'/'.join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def choose_model(config: ml_collections.ConfigDict, variables,
                 sources: Dict[str, str]) -> str:
  """The config.model ('cnn' or 'tiny') whose variable shapes `variables`
  has; refuses, naming the first layer (in model order) that fits neither."""
  module = lambda path: '/'.join(path.split('/')[1:-1])
  order = {m: i for i, m in enumerate(sources)}
  got = _shapes(variables)
  first_mismatch = None
  for name in ('cnn', 'tiny'):
    want = _shapes(checkpointing.abstract_variables(
        ml_collections.ConfigDict({**config.to_dict(), 'model': name})))
    bad = [k for k in sorted(want, key=lambda k: (order[module(k)], k))
           if got.get(k) != want[k]]
    if not bad:
      return name
    first_mismatch = first_mismatch or (bad[0], want[bad[0]])
  path, shape = first_mismatch
  raise errors.UserError(
      f'Keras layer {sources[module(path)]!r} holds {path.split("/")[-1]} of '
      f'shape {got.get(path)}, expected {shape} (the original widths 32, 64, '
      '96, 128 and 512): this is not the original gender CNN.')


def load_keras_model(path: str):
  """Loads a full Keras model file (.keras or .h5) without its optimizer."""
  if not os.path.isfile(path):
    raise errors.UserError(f'{path!r} does not exist: pass the .keras or .h5 '
                        'file the original project saved.')
  if not path.lower().endswith(KERAS_SUFFIXES):
    raise errors.UserError(f'{path!r}: expected a Keras model file ending in '
                        f'{", ".join(KERAS_SUFFIXES)}.')
  import keras  # pylint: disable=g-import-not-at-top
  try:
    return keras.saving.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
        f'Keras cannot load {path!r} ({type(e).__name__}: {e}); pass a full '
        'model file saved with model.save(), not weights only.') from e


def _write_workdir(workdir: str, config, variables, meta) -> None:
  """Writes config.json and best/0 into a temporary folder beside `workdir`
  and renames them into place (config.json last), so a failed import (a
  full disk...) leaves nothing that blocks its rerun."""
  parent = os.path.dirname(os.path.abspath(workdir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(workdir)}.tmp-',
                         dir=parent)
  try:
    checkpointing.write_config(tmp, config)
    checkpointer = checkpointing.Checkpointer(tmp)
    try:
      checkpointer.save_best(0, variables, meta)
    finally:
      checkpointer.close()
    os.makedirs(workdir, exist_ok=True)
    os.rename(os.path.join(tmp, 'best'), os.path.join(workdir, 'best'))
    os.replace(os.path.join(tmp, checkpointing.CONFIG_FILE),
               os.path.join(workdir, checkpointing.CONFIG_FILE))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def import_keras(keras_path: str, workdir: str,
                 base_config: ml_collections.ConfigDict,
                 model: Optional[Any] = None) -> Dict[str, Any]:
  """Writes `workdir` (config.json and best/0) from a Keras model file.

  `base_config` gives every other field (configs/default.py). `model` is an
  already loaded Keras model (then `keras_path` only names the source).
  Refuses a workdir that already holds a run. Returns a summary.
  """
  for existing in (checkpointing.CONFIG_FILE, 'best', 'checkpoints'):
    if os.path.exists(os.path.join(workdir, existing)):
      raise errors.UserError(
          f'{workdir!r} already holds a run ({existing}); choose a new '
          '--workdir.')
  if model is None:
    model = load_keras_model(keras_path)
  variables, settings = keras_variables(model)
  config = ml_collections.ConfigDict(base_config.to_dict())
  config.image_size = settings['image_size']
  config.flatten_dropout_rate = settings['flatten_dropout_rate']
  config.dropout_rate = settings['dropout_rate']
  config.model = choose_model(config, variables, settings['sources'])
  config_lib.validate(config)
  meta = {'step': 0, 'epoch': 0, 'imported_from': os.path.abspath(keras_path),
          'keras_layers': settings['sources']}
  _write_workdir(workdir, config, variables, meta)
  return {'workdir': workdir, 'model': config.model,
          'image_size': list(config.image_size),
          'flatten_dropout_rate': config.flatten_dropout_rate,
          'dropout_rate': config.dropout_rate,
          'num_params': int(sum(v.size for v in
                                jax.tree.leaves(variables['params'])))}
