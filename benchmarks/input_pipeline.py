r"""Images/s of the training input pipeline reading the TFDS shards.

Runs `input_pipeline.train_iterator` (shuffle + repeat on, full batches,
global jax.Arrays on the data mesh) and times batches after a warm-up that
includes filling the shuffle buffer:

  python benchmarks/input_pipeline.py --data_dir=/work/data/gender_faces_218x178 \
      [--image_height=218 --image_width=178 --batch_size=128 --steps=150]
"""

import os
import time

from absl import app
from absl import flags
import jax

from gender_jax import config_lib
from gender_jax import dataset
from gender_jax import input_pipeline
from gender_jax import sharding

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir.',
                                required=True)
_HEIGHT = flags.DEFINE_integer('image_height', 218, 'config.image_size[0].')
_WIDTH = flags.DEFINE_integer('image_width', 178, 'config.image_size[1].')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_SHUFFLE = flags.DEFINE_integer('shuffle_buffer', 10_000, 'Shuffle buffer.')
_REPEAT = flags.DEFINE_integer('repeat', 2, 'Training set repeats per epoch.')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed batches first.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Timed batches.')


def main(argv):
  del argv
  config = config_lib.load_sibling(
      os.path.join(os.path.dirname(__file__), os.pardir, 'configs',
                   'default.py'), 'default.py')
  config.data_dir = _DATA_DIR.value
  config.image_size = (_HEIGHT.value, _WIDTH.value)
  config.batch_size = _BATCH.value
  config.shuffle_buffer = _SHUFFLE.value
  config.repeat = _REPEAT.value
  builder = dataset.load_builder(config.data_dir)
  steps = input_pipeline.train_steps_per_epoch(config, builder)
  if _WARMUP.value + _STEPS.value > steps:
    raise app.UsageError(f'--warmup + --steps must be <= {steps} (one epoch)')
  start = time.perf_counter()
  batches = input_pipeline.train_iterator(config, builder,
                                          sharding.make_mesh(), epoch=0)
  for _ in range(_WARMUP.value):
    jax.block_until_ready(next(batches))
  warm = time.perf_counter()
  for _ in range(_STEPS.value):
    jax.block_until_ready(next(batches))
  seconds = time.perf_counter() - warm
  print(f'data_dir={config.data_dir} stored '
        f'{input_pipeline.stored_image_size(builder)} -> {config.image_size} '
        f'batch {config.batch_size} shuffle {config.shuffle_buffer} repeat '
        f'{config.repeat}: warm-up {_WARMUP.value} batches '
        f'{warm - start:.1f} s; {_STEPS.value} batches in {seconds:.2f} s = '
        f'{_STEPS.value * config.batch_size / seconds:.0f} images/s '
        f'on {os.cpu_count()} CPUs, {jax.device_count()} device(s)')


if __name__ == '__main__':
  app.run(main)
