r"""Fits a temperature for a workdir's p(male) and stores it in the workdir.

  python scripts/calibrate.py --workdir=runs/stage2 [--data_dir=/path/tfds] \
      [--split=validation]

Runs the best model over every example of the split, fits the temperature T
that minimises the log loss of sigmoid(logit / T), and writes
<workdir>/calibration.json (temperature, split, checkpoint step, ECE and log
loss before and after). evaluate.py, label.py, Predictor.from_workdir and
export.py then use the calibrated p(male). Training does this at its end
(config.calibrate); run this for imported workdirs or another split. A
mistake in the flags, workdir, dataset or split is one line on stderr and
exit status 2.
"""

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before TensorFlow is imported (by evaluate).
from gender_jax import calibration  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or imported '
                               'workdir (its best checkpoint is calibrated).',
                               required=True)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, "TFDS data_dir (default: the workdir config's).")
_SPLIT = flags.DEFINE_string('split', 'validation', 'Split to fit on (never '
                             'the test split you report).')


def main(argv):
  cli.start()
  # A missing workdir, dataset or checkpoint is a FileNotFoundError that says
  # which and what to do; an unknown or empty split a cli.UserError.
  with cli.user_errors(argv[0], FileNotFoundError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    result = calibration.calibrate_workdir(_WORKDIR.value, _DATA_DIR.value,
                                           _SPLIT.value)
  print(calibration.describe(result))
  print(f'Wrote {calibration.calibration_path(_WORKDIR.value)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
