r"""Imports the original Keras model's weights into a new gender_jax workdir.

  python scripts/import_keras.py --keras_model=model_1.keras --workdir=runs/keras

The workdir (config.json from configs/default.py with the model's image size
and dropout rates, best/0 with params and BatchNorm statistics) then works
with scripts/evaluate.py, scripts/label.py, scripts/export.py and as stage 2's
--config.init_from. Only the original architecture is accepted.
"""

import json
import os

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before Keras (TensorFlow) is imported.
from gender_jax import config_lib  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import keras_import  # pylint: disable=g-import-not-at-top,g-bad-import-order

_KERAS_MODEL = flags.DEFINE_string(
    'keras_model', None, 'Keras model file (.keras or .h5, saved with '
    'model.save()).', required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'New workdir to write.',
                               required=True)

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def main(argv):
  cli.start()
  base = config_lib.load_sibling(os.path.join(_CONFIGS, 'x'), 'default.py')
  with cli.user_errors(argv[0]):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    summary = keras_import.import_keras(_KERAS_MODEL.value, _WORKDIR.value,
                                        base)
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
