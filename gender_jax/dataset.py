"""The `gender_faces` TFDS dataset: features, record format and loading.

Records keep the original Keras project's TFRecord format, so its shards are
valid shards of this dataset as they are:

  images: bytes of `tf.io.serialize_tensor(uint8 HxWx3 RGB image)`
  label:  int64, female = 0, male = 1 (`gender_jax.labels`)

`SerializedImage` is the TFDS feature connector for the `images` bytes. TFDS
stores its qualified name (`gender_jax.dataset.SerializedImage`) in
`features.json` and imports this module to rebuild it when the dataset is
loaded with `tfds.builder_from_directory`.
"""

import os
import re

from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gender_jax import errors
from gender_jax import labels

try:  # TF only reads and writes data here; keep it off the accelerators.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's runtime already started elsewhere.
  pass

NAME = 'gender_faces'
VERSION = '1.0.0'
IMAGE_KEY = 'images'                 # Original project's feature names.
LABEL_KEY = 'label'


class SerializedImage(tfds.features.FeatureConnector):
  """A uint8 (H, W, 3) image stored as `tf.io.serialize_tensor` bytes."""

  def __init__(self, shape, *, doc=None):
    super().__init__(doc=doc)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[-1] != 3:
      raise ValueError(f'SerializedImage needs shape (H, W, 3), got {shape}')
    self._shape = shape

  def get_tensor_info(self):
    return tfds.features.TensorInfo(shape=self._shape, dtype=np.uint8)

  def get_serialized_info(self):
    return tfds.features.TensorInfo(shape=(), dtype=np.object_)

  def encode_example(self, example_data):
    image = np.asarray(example_data)
    if image.shape != self._shape or image.dtype != np.uint8:
      raise ValueError(f'expected a uint8 image of shape {self._shape}, got '
                       f'{image.dtype} {image.shape}')
    return serialize_image(image)

  def decode_example(self, tfexample_data):
    image = tf.io.parse_tensor(tfexample_data, tf.uint8)
    image.set_shape(self._shape)
    return image

  def decode_example_np(self, example_data):
    return parse_image(example_data, self._shape)

  def to_json_content(self):
    return {'shape': list(self._shape)}

  @classmethod
  def from_json_content(cls, value, doc=None):
    return cls(shape=value['shape'], doc=doc)


def features(image_size):
  """The dataset's features for images of `image_size` = (height, width)."""
  height, width = image_size
  return tfds.features.FeaturesDict({
      IMAGE_KEY: SerializedImage(shape=(height, width, 3)),
      LABEL_KEY: tfds.features.ClassLabel(names=list(labels.CLASS_NAMES)),
  })


def serialize_image(image: np.ndarray) -> bytes:
  """The original record's `images` bytes: `tf.io.serialize_tensor(image)`."""
  return tf.io.serialize_tensor(tf.convert_to_tensor(image, tf.uint8)).numpy()


def parse_image(data: bytes, shape=None) -> np.ndarray:
  """Inverse of `serialize_image`; checks the shape when one is given."""
  image = tf.io.parse_tensor(data, tf.uint8).numpy()
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'not a serialized HxWx3 image: shape {image.shape}')
  if shape is not None and tuple(image.shape) != tuple(shape):
    raise ValueError(f'image shape {image.shape} != expected {tuple(shape)}')
  return image


def dataset_dir(data_dir: str, name: str = NAME, version: str = VERSION) -> str:
  """`<data_dir>/<name>/<version>`: where the shards and metadata live."""
  return os.path.join(os.fspath(data_dir), name, version)


def load_builder(data_dir: str, name: str = NAME,
                 version: str = VERSION) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a dataset made by `scripts/prepare_data.py`."""
  path = dataset_dir(data_dir, name, version)
  if not os.path.exists(os.path.join(path, 'dataset_info.json')):
    raise FileNotFoundError(
        f'No TFDS dataset {name!r} (version {version}) at {path}. Make it '
        'from the raw image folders with\n  python scripts/prepare_data.py '
        f'--raw_dir=<folder with Train/ Validation/ [Test/]> --data_dir={data_dir}'
        '\nor wrap the original project\'s TFRecord shards with\n  python '
        'scripts/prepare_data.py --tfrecord_dir=<shards folder> '
        f'--data_dir={data_dir}')
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises JSON, protobuf or KeyError for damaged metadata files.
    raise DataError(
        f'the dataset metadata in {path} cannot be read ({type(e).__name__}: '
        f'{first_line(e)}); remake the dataset with scripts/prepare_data.py '
        '--overwrite.') from e


class DataError(errors.UserError):
  """A damaged dataset file; the message names it and how to remake it."""


def first_line(error) -> str:
  """The first line of an error's text, without TensorFlow's op decorations
  ('{{function_node ...}}', '[Op:IteratorGetNext] name:')."""
  text = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:[^\]]*\].*', '', str(error))
  lines = text.strip().splitlines()
  return lines[0][:300] if lines else ''


def read_records(path: str) -> Tuple[int, Optional[str]]:
  """(records, None) for a sound TFRecord file; (records read, why) for one
  that is unreadable or corrupt (TFRecord CRC)."""
  count = 0
  try:
    for _ in tf.data.TFRecordDataset(path):
      count += 1
  except tf.errors.OpError as e:
    return count, (f'{type(e).__name__} after {count} records '
                   f'({first_line(e.message)})')
  return count, None


def shard_problems(builder: tfds.core.DatasetBuilder,
                   splits: Optional[Sequence[str]] = None) -> List[str]:
  """Reads every record of the stored `splits` (default: all) and returns one
  line per shard file that is unreadable, corrupt (TFRecord CRC) or holds
  another number of records than the metadata says. [] when all are sound."""
  problems = []
  for split in splits or sorted(builder.info.splits):
    info = builder.info.splits[split]
    for name, expected in zip(info.filenames, info.shard_lengths):
      path = os.path.join(builder.data_dir, name)
      count, problem = read_records(path)
      if problem:
        problems.append(f'{path}: {problem}')
      elif count != expected:
        problems.append(f'{path}: {count} records, the metadata says '
                        f'{expected}')
  return problems


def damage_error(builder: tfds.core.DatasetBuilder, split: str,
                 error: BaseException) -> DataError:
  """The DataError for `error` met while reading `split`: names the damaged
  shard files (found by `shard_problems`) and the fix."""
  stored = [s.split('[')[0].strip() for s in split.split('+')]
  problems = shard_problems(builder, stored)
  where = ('; '.join(problems) if problems else
           f'{type(error).__name__}: {first_line(error)}')
  return DataError(
      f'reading split {split!r} of {builder.data_dir} failed: {where}. Remake '
      'the dataset with scripts/prepare_data.py --overwrite (check every '
      'shard with scripts/prepare_data.py --verify --data_dir=...).')


def source_splits(builder: tfds.core.DatasetBuilder, part: str) -> list:
  """The stored `<part>_<source>` splits of a dataset of several sources."""
  return sorted(s for s in builder.info.splits
                if s.startswith(f'{part}_') and s[len(part) + 1:].isalnum())


def resolve_split(builder: tfds.core.DatasetBuilder, split: str) -> str:
  """`split` as TFDS reads it from this dataset.

  A stored split (also sliced, 'train[:10%]', or a '+' union) is returned as
  it is. On a dataset of several sources (see `gender_jax.prepare_data`)
  'train', 'validation' and 'test' name the union of that part's source
  splits ('test' -> 'test_folders+test_utkface'). UserError for a split the
  dataset does not have.
  """
  parts = []
  for part in split.split('+'):
    part = part.strip()
    name = part.split('[')[0].strip()
    if name in builder.info.splits:
      parts.append(part)
      continue
    members = source_splits(builder, name)
    if not members:
      raise errors.UserError(
          f'split {part!r} is not in the dataset at {builder.data_dir}; it '
          f'has {sorted(builder.info.splits)}.')
    if name != part:
      raise errors.UserError(
          f'split {part!r}: {name!r} is the union {"+".join(members)}; slice '
          f'its parts instead, e.g. {members[0]}{part[len(name):]}.')
    parts += members
  return '+'.join(parts)


def metadata(builder: tfds.core.DatasetBuilder) -> dict:
  """The dataset's `metadata.json` (sources, framing) as a dict; {} for
  datasets written without one (original shards, older versions)."""
  return dict(builder.info.metadata or {})
