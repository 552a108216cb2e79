r"""Makes the `gender_faces` TFDS dataset that training reads.

From one or more labelled sources, framed, resized and re-encoded in the
original TFRecord format (kinds: `gender_jax.sources`):

  python scripts/prepare_data.py --raw_dir=/path/gender-faces \
      --data_dir=/path/tfds [--image_height=218 --image_width=178] \
      [--num_shards=N] [--num_workers=N] [--overwrite]
  python scripts/prepare_data.py --source=folders:/path/gender-faces \
      --source=utkface:/path/UTKFace [--source=celeba:/path/CelebA] \
      [--source=csv:/path/list.csv] --data_dir=/path/tfds \
      [--val_fraction=0.1 --test_fraction=0.1] [--resize=stretch|crop|pad] \
      [--boxes=boxes.csv --box_margin=0.1]

`--raw_dir=X` is `--source=folders:X`. Several sources give the splits
`<part>_<source>` (train_utkface, test_folders, ...); `train`, `validation`
and `test` still name each part's union.

From the original project's TFRecord shards (train_male.tfrecord-01-of-20, ...),
linked (or --copy'd) without re-encoding:

  python scripts/prepare_data.py --tfrecord_dir=/path/tfrecords \
      --data_dir=/path/tfds [--copy] [--overwrite]

Checking a dataset (every record read and counted against the metadata):

  python scripts/prepare_data.py --verify --data_dir=/path/tfds

The dataset lands in <data_dir>/gender_faces/1.0.0; train with
--config.data_dir=<data_dir>. The summary (counts, skipped files and why) is
printed on stdout; progress and warnings go to stderr. A mistake in the
flags or the input layout is one line on stderr and exit status 2.
"""

from absl import app
from absl import flags

from gender_jax import cli
cli.quiet_tensorflow()   # Before prepare_data imports TensorFlow.
from gender_jax import image_io  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import prepare_data  # pylint: disable=g-import-not-at-top,g-bad-import-order
from gender_jax import sources  # pylint: disable=g-import-not-at-top,g-bad-import-order

_RAW_DIR = flags.DEFINE_string(
    'raw_dir', None, 'Raw image folder set (the same as --source=folders:DIR).')
_SOURCES = flags.DEFINE_multi_string(
    'source', [], 'A labelled source [NAME=]KIND:PATH, KIND one of '
    f'{"|".join(sources.KINDS)}; repeat for several.')
_VAL_FRACTION = flags.DEFINE_float(
    'val_fraction', sources.DEFAULT_VAL_FRACTION,
    'Validation share of a source without its own splits (by content hash).')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', sources.DEFAULT_TEST_FRACTION,
    'Test share of a source without its own splits (by content hash).')
_RESIZE = flags.DEFINE_enum(
    'resize', 'stretch', image_io.RESIZE_MODES,
    "How an image meets the model's aspect ratio: stretch (the original's), "
    'centre crop, or pad.')
_BOXES = flags.DEFINE_string(
    'boxes', None, 'CSV of face boxes path,x,y,w,h (pixels; paths relative '
    "to the source's folder, e.g. VGGFace2's loose_bb_*.csv).")
_BOX_MARGIN = flags.DEFINE_float(
    'box_margin', 0.0, 'Grow each face box by this fraction of its size on '
    'every side before cropping.', lower_bound=0.0)
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
_VERIFY = flags.DEFINE_bool(
    'verify', False, 'Only check the dataset in --data_dir: read every '
    'record and count it against the metadata.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an existing dataset (atomically).')


def main(argv):
  with cli.user_errors(argv[0], FileExistsError, FileNotFoundError):
    if len(argv) > 1:
      raise cli.UserError(f'unexpected arguments: {argv[1:]}')
    if _VERIFY.value:
      print(prepare_data.verify(_DATA_DIR.value))
      return
    specs = list(_SOURCES.value)
    if _RAW_DIR.value:
      specs.insert(0, f'folders:{_RAW_DIR.value}')
    if bool(specs) == bool(_TFRECORD_DIR.value):
      raise cli.UserError('give --raw_dir or --source (one or more), or '
                          '--tfrecord_dir alone.')
    if specs:
      result = prepare_data.prepare_sources(
          specs, _DATA_DIR.value, image_size=(_HEIGHT.value, _WIDTH.value),
          val_fraction=_VAL_FRACTION.value, test_fraction=_TEST_FRACTION.value,
          resize=_RESIZE.value, boxes=_BOXES.value,
          box_margin=_BOX_MARGIN.value, num_shards=_NUM_SHARDS.value,
          num_workers=_NUM_WORKERS.value, overwrite=_OVERWRITE.value)
    else:
      result = prepare_data.wrap_tfrecords(
          _TFRECORD_DIR.value, _DATA_DIR.value, copy=_COPY.value,
          overwrite=_OVERWRITE.value)
  print(result.summary())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
