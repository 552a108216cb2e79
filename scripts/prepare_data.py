r"""Makes the `gender_faces` TFDS dataset that training reads.

From raw image folders (Train|Training, Validation|Valid|Val, optional Test,
each with Male|man and Female|woman), resized and re-encoded in the original
TFRecord format:

  python scripts/prepare_data.py --raw_dir=/path/gender-faces \
      --data_dir=/path/tfds [--image_height=218 --image_width=178] \
      [--num_shards=N] [--num_workers=N] [--overwrite]

From the original project's TFRecord shards (train_male.tfrecord-01-of-20, ...),
linked (or --copy'd) without re-encoding:

  python scripts/prepare_data.py --tfrecord_dir=/path/tfrecords \
      --data_dir=/path/tfds [--copy] [--overwrite]

The dataset lands in <data_dir>/gender_faces/1.0.0; train with
--config.data_dir=<data_dir>. The summary (counts, skipped files and why) is
printed on stdout; progress and warnings go to stderr. A mistake in the
flags or the input layout is one line on stderr and exit status 2.
"""

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before prepare_data imports TensorFlow.
from gender_jax import prepare_data  # pylint: disable=g-import-not-at-top,g-bad-import-order

_RAW_DIR = flags.DEFINE_string('raw_dir', None, 'Raw image folder set.')
_TFRECORD_DIR = flags.DEFINE_string(
    'tfrecord_dir', None, "Folder of the original project's TFRecord shards.")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write.',
                                required=True)
_HEIGHT = flags.DEFINE_integer('image_height', 218, 'Output image height.',
                               lower_bound=1)
_WIDTH = flags.DEFINE_integer('image_width', 178, 'Output image width.',
                              lower_bound=1)
_NUM_SHARDS = flags.DEFINE_integer(
    'num_shards', None, 'Shards per split (default: one per ~1000 images).',
    lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Decoding processes (default: all CPU cores).',
    lower_bound=1)
_COPY = flags.DEFINE_bool('copy', False,
                          'With --tfrecord_dir: copy shards, not symlink.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an existing dataset (atomically).')


def main(argv):
  with cli.user_errors(argv[0], FileExistsError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    if bool(_RAW_DIR.value) == bool(_TFRECORD_DIR.value):
      raise cli.UserError('give exactly one of --raw_dir or --tfrecord_dir.')
    if _RAW_DIR.value:
      result = prepare_data.prepare_raw(
          _RAW_DIR.value, _DATA_DIR.value,
          image_size=(_HEIGHT.value, _WIDTH.value),
          num_shards=_NUM_SHARDS.value, num_workers=_NUM_WORKERS.value,
          overwrite=_OVERWRITE.value)
    else:
      result = prepare_data.wrap_tfrecords(
          _TFRECORD_DIR.value, _DATA_DIR.value, copy=_COPY.value,
          overwrite=_OVERWRITE.value)
  print(result.summary())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
