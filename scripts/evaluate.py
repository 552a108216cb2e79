r"""Evaluates a trained model on a whole split and writes report + pictures.

  python scripts/evaluate.py --workdir=runs/stage2 --data_dir=/path/tfds \
      --split=test [--checkpoint=best|latest] [--batch_size=256] \
      [--output_dir=DIR]

Writes <workdir>/eval_<split>/{report.json, confusion_matrix.png,
reliability_diagram.png, wrong_predictions*.png, TensorBoard events} and
prints the report as a table.
"""

import sys

from absl import app
from absl import flags

from gender_jax import cli
from gender_jax import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, "TFDS data_dir (default: the workdir config's).")
_SPLIT = flags.DEFINE_string('split', 'test', "Split, e.g. 'test', "
                             "'validation', 'train[:10%]'.")
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Which checkpoint to evaluate.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Eval batch size (default: config.eval_batch_size).')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where to write (default: <workdir>/eval_<split>).')
_MAX_WRONG = flags.DEFINE_integer(
    'max_wrong', evaluate.MAX_WRONG, 'Most misclassified faces to draw.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  try:
    report = evaluate.evaluate(
        _WORKDIR.value, _DATA_DIR.value, _SPLIT.value,
        checkpoint=_CHECKPOINT.value, batch_size=_BATCH_SIZE.value,
        max_wrong=_MAX_WRONG.value, output_dir=_OUTPUT_DIR.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'evaluate.py: {e}')
  print(f"{report['split']}: {report['num_examples']} examples, "
        f"{report['checkpoint']} checkpoint (step {report['step']}, "
        f"epoch {report['epoch']})\n")
  print(evaluate.format_report(report))
  print(f"\nWrote {report['output_dir']}")


if __name__ == '__main__':
  app.run(main)
