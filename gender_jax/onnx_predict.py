"""ONNX Runtime inference of an exported GenderCNN: p(male) without JAX.

`OnnxModel` runs a model written by `gender_jax.onnx_export` (a file, or
built in memory from a workdir's variables) on CPU and returns the same
{'logit', 'p_male'} as `predict.predict_batch` with mc_samples=1. It needs
only numpy and onnxruntime, so a serving process can use it without JAX:

  model = OnnxModel('model.onnx')
  out = model(images_uint8)          # {'logit': (N,), 'p_male': (N,)}

MC-Dropout is not exported (dropout is off in the graph): it runs in JAX.
"""

from typing import Dict, Optional, Union

import numpy as np
import onnxruntime as ort

_NUMPY_DTYPES = {'tensor(float)': np.float32, 'tensor(uint8)': np.uint8}


class OnnxModel:
  """An ONNX Runtime CPU session of an exported model.

  Args:
    model: path of an .onnx file, or the serialized model (bytes).
    num_threads: intra-op threads (default: ONNX Runtime's, the cores).
    spinning: let idle intra-op threads busy-wait for the next op (ONNX
      Runtime's default). Off by default: the labeller decodes images in
      threads of the same process, and spinning workers take their CPU
      (and that of other processes on a shared machine).
  """

  def __init__(self, model: Union[str, bytes],
               num_threads: Optional[int] = None, spinning: bool = False):
    options = ort.SessionOptions()
    if num_threads:
      options.intra_op_num_threads = num_threads
    options.add_session_config_entry('session.intra_op.allow_spinning',
                                     '1' if spinning else '0')
    self.session = ort.InferenceSession(
        model, options, providers=['CPUExecutionProvider'])
    (inp,) = self.session.get_inputs()
    self.input_name = inp.name
    self.input_dtype = _NUMPY_DTYPES[inp.type]
    self.image_size = tuple(inp.shape[1:3])
    self.output_names = [o.name for o in self.session.get_outputs()]

  @classmethod
  def from_variables(cls, variables, image_size, temperature: float = 1.0,
                     **kwargs) -> 'OnnxModel':
    """Builds the graph in memory from {'params', 'batch_stats'}, its logit
    divided by `temperature`."""
    from gender_jax import onnx_export  # pylint: disable=g-import-not-at-top
    model = onnx_export.build_model(variables, image_size, input_dtype='uint8',
                                    temperature=temperature)
    return cls(model.SerializeToString(), **kwargs)

  def __call__(self, images) -> Dict[str, np.ndarray]:
    """{'logit', 'p_male'}, each (N,) float32, of (N, H, W, 3) 0..255 images."""
    images = np.asarray(images)
    if images.shape[1:] != (*self.image_size, 3):
      raise ValueError(f'images of shape {images.shape}: expected (N, '
                       f'{self.image_size[0]}, {self.image_size[1]}, 3).')
    outputs = self.session.run(
        self.output_names,
        {self.input_name: images.astype(self.input_dtype, copy=False)})
    return dict(zip(self.output_names, outputs))
