r"""Validation/test accuracy of a workdir's best model with its BatchNorm
running averages against precise BatchNorm statistics over N batches.

The measurement behind the `precise_bn_batches` defaults: for each N it
recomputes the statistics for the model's weights on N training batches of
the workdir's own config (augmentation as in its training) and evaluates:

  python benchmarks/precise_bn.py --workdir=runs/stage1 --batches=0,10,25,50,100

N = 0 is the checkpoint as saved.
"""

import json
import time

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before the others import TensorFlow.
from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import dataset  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import evaluate  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import models  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import predict  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import sharding  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import steps  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import train  # pylint: disable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                "TFDS data_dir (default: the workdir's).")
_BATCHES = flags.DEFINE_list('batches', ['0', '10', '25', '50', '100'],
                             'Numbers of training batches to try.')
_STEP = flags.DEFINE_integer(
    'step', None, 'A kept train-state checkpoint (checkpoints/<step>) '
    'instead of the best model.')
_SPLITS = flags.DEFINE_list('splits', ['validation', 'test'],
                            'Splits to evaluate.')


def main(argv):
  del argv
  cli.start()
  config = checkpointing.read_config(_WORKDIR.value)
  if _DATA_DIR.value:
    config.data_dir = _DATA_DIR.value
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  if _STEP.value is None:
    variables, meta = checkpointing.restore_best(
        _WORKDIR.value, config, sharding=sharding.replicated(mesh))
  else:
    variables, meta = checkpointing.restore_latest_variables(
        _WORKDIR.value, config, sharding=sharding.replicated(mesh),
        step=_STEP.value)
  builder = dataset.load_builder(config.data_dir, config.dataset)
  predict_fn = predict.make_predict_fn(model, mesh=mesh)
  print(f'{_WORKDIR.value}: step {meta["step"]}, epoch {meta["epoch"]}, '
        f'augment {config.augment}, batch {config.batch_size}')
  for n in map(int, _BATCHES.value):
    start = time.time()
    stats = variables['batch_stats']
    if n:
      config.precise_bn_batches = n
      stats = steps.make_precise_bn(config, model, mesh)(
          variables, builder,
          meta['epoch'] if _STEP.value is not None else max(meta['epoch'] - 1, 0))
    seconds = time.time() - start
    row = {'batches': n, 'seconds': round(seconds, 1)}
    for split in _SPLITS.value:
      r = train.validation_metrics(*evaluate.predict_split(
          config, builder, mesh, predict_fn,
          {**variables, 'batch_stats': stats}, split, max_wrong=0)[:2])
      row[f'{split}_accuracy'] = round(r['accuracy'], 4)
      row[f'{split}_loss'] = round(r['loss'], 4)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
