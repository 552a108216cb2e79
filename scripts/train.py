r"""Trains the gender classifier (stage 1 from scratch, stage 2 fine-tuning).

  python scripts/train.py --config=configs/stage1.py --workdir=runs/stage1 \
      --config.data_dir=/path/tfds
  python scripts/train.py --config=configs/stage2.py --workdir=runs/stage2 \
      --config.data_dir=/path/tfds --config.init_from=runs/stage1

Any config field can be overridden with --config.<field>=<value>. The same
command runs on one CPU, one GPU, a TPU slice or several hosts (set
--config.distributed or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID on each host). Rerunning with the same --workdir resumes from
its latest checkpoint. TensorBoard: tensorboard --logdir=<workdir>.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before train imports TensorFlow.
from gender_jax import train  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'TensorBoard events and results.',
                               required=True)
config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                lock_config=True)


def main(argv):
  cli.start()
  with cli.user_errors(__file__, FileNotFoundError, train.TrainingError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    summary = train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  final = summary['final_evaluation']
  print(json.dumps({'workdir': _WORKDIR.value,
                    'best_epoch': summary['best_epoch'],
                    'best_val_accuracy': summary['best_val_accuracy'],
                    **{f'{split}_accuracy': r['accuracy']
                       for split, r in final.items()},
                    'train_seconds': summary['train_seconds']}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=cli.parse_flags)
