r"""Exports a workdir's best model for serving without JAX.

  python scripts/export.py --workdir=runs/stage2 --format=onnx \
      --output=model.onnx [--input_dtype=uint8]

The ONNX model takes (N, H, W, 3) RGB images in 0..255 (N dynamic; float32
or uint8) and returns `logit` and `p_male`, each (N,), calibrated by the
workdir's calibration.json if it has one (the logit divided by its
temperature); run it with gender_jax.onnx_predict.OnnxModel or any ONNX
runtime. Only the deterministic pass is exported: MC-Dropout runs in JAX
(scripts/label.py --mc_samples).
"""

import json

from absl import app
from absl import flags

from gender_jax import cli
from gender_jax import onnx_export

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or imported '
                               'workdir (its best checkpoint is exported).',
                               required=True)
_FORMAT = flags.DEFINE_enum('format', 'onnx', ['onnx'], 'Export format.')
_OUTPUT = flags.DEFINE_string('output', None, 'File to write.', required=True)
_INPUT_DTYPE = flags.DEFINE_enum('input_dtype', 'float32',
                                 sorted(onnx_export.INPUT_DTYPES),
                                 'Element type of the image input.')


def main(argv):
  cli.start()
  with cli.user_errors(argv[0], FileNotFoundError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    summary = onnx_export.export_workdir(_WORKDIR.value, _OUTPUT.value,
                                         input_dtype=_INPUT_DTYPE.value)
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
