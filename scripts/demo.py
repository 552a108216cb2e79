r"""Runs the whole pipeline on generated (synthetic) data in a few CPU minutes.

  python scripts/demo.py [--workdir=demo_workdir]

Generates stand-in images, prepares them as TFRecord/TFDS, trains stage 1 and
stage 2 with configs/stage1.py and configs/stage2.py (shrunk to 48x40 images),
evaluates on the test split and labels the test folder with MC-Dropout.
"""

import json
import os

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before demo imports TensorFlow.
from gender_jax import config_lib  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import demo  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', 'demo_workdir',
                               'Where the demo writes data, runs and labels.')
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def main(argv):
  cli.start()
  if len(argv) > 1:
    cli.fail(os.path.basename(argv[0]), f'unexpected arguments: {argv[1:]}')
  stage1 = config_lib.load_sibling(os.path.join(_CONFIGS, 'x'), 'stage1.py')
  stage2 = config_lib.load_sibling(os.path.join(_CONFIGS, 'x'), 'stage2.py')
  print(json.dumps(demo.run_demo(stage1, stage2, _WORKDIR.value), indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
