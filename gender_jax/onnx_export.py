"""Exports a trained GenderCNN to ONNX, for serving on CPU without JAX.

The graph is written with onnx's helper API for this one architecture rather
than traced by a converter: jax2onnx (the maintained JAX exporter) pulls in
orbax-export, which downgrades the project's orbax-checkpoint, and a traced
graph would carry the CPU kernels of `gender_jax.cpu_kernels`
(space-to-depth first conv, fused BatchNorm-swish-pool) instead of plain ops.
It is built from the variable tree alone, with inference BatchNorm folded
into the preceding layer:

  images (N, H, W, 3) in 0..255, uint8 or float32 (N dynamic)
  -> Transpose to NCHW -> Cast to float (a uint8 transpose moves 4x less)
  -> 4 x [Conv (1/255 rescale folded into the first, BatchNorm into each)
          -> Sigmoid * x (swish) -> MaxPool 2x2/2]
  -> Flatten (C, H, W order; Dense_0's rows are permuted from flax's (H, W, C))
  -> Gemm (BatchNorm folded) -> swish -> Gemm
  -> Div by the calibration temperature (only if it is not 1)
  -> outputs logit (N,) and p_male = Sigmoid(logit) (N,)

Only the deterministic pass is exported: dropout is off, so MC-Dropout
(`predict` with mc_samples > 1) runs only in JAX. `tests/onnx_export_test.py`
checks the graph against the JAX model.
"""

import os
from typing import Any, Dict, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto

from gender_jax import fileio
from gender_jax import models

OPSET = 17          # ONNX Runtime >= 1.13 runs it.
INPUT_NAME = 'images'
OUTPUT_NAMES = ('logit', 'p_male')
INPUT_DTYPES = {'float32': TensorProto.FLOAT, 'uint8': TensorProto.UINT8}


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def fold_batchnorm(kernel, params, stats, epsilon=models.BN_EPSILON):
  """(kernel, bias) of a bias-free layer followed by inference BatchNorm.

  BatchNorm(y) = (y - mean) * s + bias with s = scale / sqrt(var + eps), so
  the output channels of `kernel` (last axis) are scaled by s and the bias is
  bias - mean * s.
  """
  s = _np(params['scale']) / np.sqrt(_np(stats['var']) + np.float32(epsilon))
  return _np(kernel) * s, _np(params['bias']) - _np(stats['mean']) * s


class _Graph:
  """Collects nodes and initializers with generated unique names."""

  def __init__(self):
    self.nodes, self.initializers, self._count = [], [], 0

  def const(self, name: str, value: np.ndarray) -> str:
    self.initializers.append(numpy_helper.from_array(value, name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], output: str = '',
         **attrs) -> str:
    self._count += 1
    output = output or f'{op_type.lower()}_{self._count}'
    self.nodes.append(helper.make_node(op_type, list(inputs), [output],
                                       name=f'{op_type}_{self._count}',
                                       **attrs))
    return output

  def swish(self, x: str) -> str:
    return self.op('Mul', [x, self.op('Sigmoid', [x])])


def _num_blocks(params) -> int:
  return sum(1 for k in params if k.startswith('ConvBlock_'))


def build_model(variables: Dict[str, Any], image_size: Sequence[int], *,
                input_dtype: str = 'float32',
                epsilon: float = models.BN_EPSILON,
                temperature: float = 1.0, doc: str = '') -> onnx.ModelProto:
  """The ONNX model of a GenderCNN's {'params', 'batch_stats'} at (H, W);
  its logit is divided by `temperature` (calibrated p_male)."""
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f'input_dtype={input_dtype!r}: expected one of '
                     f'{sorted(INPUT_DTYPES)}.')
  if not (np.isfinite(temperature) and temperature > 0):
    raise ValueError(f'temperature={temperature}: expected a finite float > 0.')
  params, stats = variables['params'], variables['batch_stats']
  height, width = image_size
  g = _Graph()
  x = g.op('Transpose', [INPUT_NAME], perm=[0, 3, 1, 2])
  x = g.op('Cast', [x], to=TensorProto.FLOAT)
  for i in range(_num_blocks(params)):
    name = f'ConvBlock_{i}'
    kernel, bias = fold_batchnorm(params[name]['Conv_0']['kernel'],
                                  params[name]['BatchNorm_0'],
                                  stats[name]['BatchNorm_0'], epsilon)
    if i == 0:
      kernel = kernel * np.float32(1 / 255)    # The model's input rescale.
    k = kernel.shape[0]
    # HWIO -> OIHW; flax 'SAME' pads (k-1)//2 before and k//2 after.
    x = g.op('Conv', [x, g.const(f'{name}/kernel',
                                 kernel.transpose(3, 2, 0, 1).copy()),
                      g.const(f'{name}/bias', bias)],
             kernel_shape=[k, k], pads=[(k - 1) // 2] * 2 + [k // 2] * 2)
    x = g.op('MaxPool', [g.swish(x)], kernel_shape=[2, 2], strides=[2, 2])
    height, width = height // 2, width // 2
  x = g.op('Flatten', [x], axis=1)
  kernel, bias = fold_batchnorm(params['Dense_0']['kernel'],
                                params['BatchNorm_0'], stats['BatchNorm_0'],
                                epsilon)
  # flax flattens (H, W, C); the NCHW graph flattens (C, H, W).
  channels = kernel.shape[0] // (height * width)
  kernel = kernel.reshape(height, width, channels, -1).transpose(2, 0, 1, 3)
  x = g.op('Gemm', [x, g.const('Dense_0/kernel',
                               kernel.reshape(-1, kernel.shape[-1]).copy()),
                    g.const('Dense_0/bias', bias)])
  x = g.op('Gemm', [g.swish(x),
                    g.const('Dense_1/kernel', _np(params['Dense_1']['kernel'])),
                    g.const('Dense_1/bias', _np(params['Dense_1']['bias']))])
  if temperature != 1.0:
    x = g.op('Div', [x, g.const('temperature', _np(temperature))])
  logit = g.op('Reshape', [x, g.const('flat', np.asarray([-1], np.int64))],
               OUTPUT_NAMES[0])
  g.op('Sigmoid', [logit], OUTPUT_NAMES[1])
  h, w = image_size
  graph = helper.make_graph(
      g.nodes, 'gender_cnn',
      [helper.make_tensor_value_info(INPUT_NAME, INPUT_DTYPES[input_dtype],
                                     ['batch', h, w, 3])],
      [helper.make_tensor_value_info(n, TensorProto.FLOAT, ['batch'])
       for n in OUTPUT_NAMES],
      initializer=g.initializers)
  opsets = [helper.make_opsetid('', OPSET)]
  # The oldest IR version for the opset: older runtimes refuse newer ones.
  model = helper.make_model(
      graph, producer_name='gender_jax', doc_string=doc, opset_imports=opsets,
      ir_version=helper.find_min_ir_version_for(opsets))
  helper.set_model_props(model, {'image_size': f'{h},{w}',
                                 'input_range': '0..255 RGB, NHWC',
                                 'temperature': repr(float(temperature))})
  onnx.checker.check_model(model, full_check=True)
  return model


def export_workdir(workdir: str, output: str, *,
                   input_dtype: str = 'float32') -> Dict[str, Any]:
  """Writes `output` (.onnx) from a workdir's best checkpoint, calibrated by
  its calibration.json (if any); a summary."""
  from gender_jax import calibration  # pylint: disable=g-import-not-at-top
  from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = checkpointing.read_config(workdir)
  variables, meta = checkpointing.restore_best(workdir, config)
  temperature = calibration.read_temperature(workdir, meta.get('step'))
  model = build_model(
      variables, config.image_size, input_dtype=input_dtype,
      temperature=temperature,
      doc=f'gender_jax {config.model} from {os.path.abspath(workdir)} '
      f"(best step {meta.get('step')}, temperature {temperature:g}): "
      'p(male) of RGB faces.')
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  fileio.write_atomic(output, model.SerializeToString())
  return {'output': output, 'image_size': list(config.image_size),
          'input_dtype': input_dtype, 'opset': OPSET,
          'bytes': os.path.getsize(output), 'step': meta.get('step'),
          'temperature': temperature}
