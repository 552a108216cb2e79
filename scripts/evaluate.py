r"""Evaluates a trained model on a whole split and writes report + pictures.

  python scripts/evaluate.py --workdir=runs/stage2 --data_dir=/path/tfds \
      --split=test [--checkpoint=best|latest] [--batch_size=256] \
      [--output_dir=DIR] [--tta=flip]

Writes <workdir>/eval_<split>/{report.json, confusion_matrix.png,
reliability_diagram.png, coverage_accuracy.png, wrong_predictions*.png,
TensorBoard events} and
prints the report as a table. p(male) is calibrated by the workdir's
calibration.json (if any); log loss and ECE are also reported before it.
A mistake in the flags, workdir, dataset or split is one line on stderr and
exit status 2.
"""


from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before evaluate imports TensorFlow.
from gender_jax import evaluate  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import predict  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, "TFDS data_dir (default: the workdir config's).")
_SPLIT = flags.DEFINE_string('split', 'test', "Split, e.g. 'test', "
                             "'validation', 'train[:10%]'.")
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Which checkpoint to evaluate.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Eval batch size (default: config.eval_batch_size).',
    lower_bound=1)
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where to write (default: <workdir>/eval_<split>).')
_MAX_WRONG = flags.DEFINE_integer(
    'max_wrong', evaluate.MAX_WRONG, 'Most misclassified faces to draw.',
    lower_bound=0)
_TTA = flags.DEFINE_enum(
    'tta', 'none', predict.TTA_MODES, 'Test-time augmentation: flip = mean '
    'logit of each image and its mirror.')



def main(argv):
  cli.start()
  # A missing workdir, dataset or checkpoint is a FileNotFoundError that says
  # which and what to do; an unknown or empty split a cli.UserError.
  with cli.user_errors(argv[0], FileNotFoundError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    report = evaluate.evaluate(
        _WORKDIR.value, _DATA_DIR.value, _SPLIT.value,
        checkpoint=_CHECKPOINT.value, batch_size=_BATCH_SIZE.value,
        max_wrong=_MAX_WRONG.value, output_dir=_OUTPUT_DIR.value,
        tta=_TTA.value)
  print(f"{report['split']}: {report['num_examples']} examples, "
        f"{report['checkpoint']} checkpoint (step {report['step']}, "
        f"epoch {report['epoch']}), tta {report['tta']}\n")
  print(evaluate.format_report(report))
  print(f"\nWrote {report['output_dir']}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
