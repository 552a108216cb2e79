"""Tests for gender_jax.dataset: the original record format inside TFDS."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from gender_jax import dataset
from gender_jax import synthetic


def test_serialize_image_is_tf_serialize_tensor():
  image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), np.uint8)
  data = dataset.serialize_image(image)
  assert data == tf.io.serialize_tensor(tf.constant(image)).numpy()
  np.testing.assert_array_equal(dataset.parse_image(data, (7, 5, 3)), image)
  with pytest.raises(ValueError, match='expected'):
    dataset.parse_image(data, (5, 7, 3))


def test_feature_connector_round_trip():
  features = dataset.features((7, 5))
  image = np.random.default_rng(1).integers(0, 256, (7, 5, 3), np.uint8)
  encoded = features.encode_example({'images': image, 'label': 1})
  assert encoded['label'] == 1
  decoded = features.decode_example(
      {'images': tf.constant(encoded['images']), 'label': tf.constant(1)})
  np.testing.assert_array_equal(decoded['images'].numpy(), image)
  assert decoded['images'].shape == (7, 5, 3)
  rebuilt = tfds.features.FeatureConnector.from_json(features.to_json())
  assert rebuilt['images'].shape == (7, 5, 3)
  assert rebuilt['label'].num_classes == 2   # Names live in label.labels.txt.
  with pytest.raises(ValueError, match='uint8 image of shape'):
    features.encode_example({'images': image[:, :4], 'label': 0})


def test_load_builder_missing_says_how_to_make_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='scripts/prepare_data.py'):
    dataset.load_builder(str(tmp_path))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fresh_process_loads_with_tfds_only(tmp_path):
  """features.json names gender_jax.dataset.SerializedImage; TFDS imports it."""
  path = synthetic.make_tfds_dataset(
      str(tmp_path), counts={'Train': (3, 2), 'Validation': (1, 2)})
  code = (
      'import tensorflow_datasets as tfds\n'
      f'b = tfds.builder_from_directory({path!r})\n'
      "n = {s: b.info.splits[s].num_examples for s in b.info.splits}\n"
      "ex = next(iter(tfds.as_numpy(b.as_dataset('train'))))\n"
      "print(n['train'], n['validation'], ex['images'].shape)\n"
      f"b = tfds.builder('gender_faces', data_dir={str(tmp_path)!r})\n"
      "print(b.info.splits['train'].num_examples)\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, cwd=str(tmp_path),
                       env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert out.stdout.split('\n')[:2] == ['5 3 (24, 20, 3)', '5']


@pytest.fixture(name='damaged_copy')
def _damaged_copy(tmp_path):
  """A fresh small dataset whose first train shard the test may damage."""
  synthetic.make_tfds_dataset(str(tmp_path), image_size=(24, 20))
  folder = dataset.dataset_dir(str(tmp_path))
  shard = os.path.join(folder, sorted(
      n for n in os.listdir(folder) if '-train.' in n)[0])
  return str(tmp_path), shard


@pytest.mark.parametrize('how', ['truncate', 'flip'])
def test_damaged_shard_is_named(damaged_copy, how):
  from gender_jax import config_lib, input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  data_dir, shard = damaged_copy
  size = os.path.getsize(shard)
  with open(shard, 'r+b') as f:
    if how == 'truncate':
      f.truncate(size // 2 + 7)
    else:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
  builder = dataset.load_builder(data_dir)
  problems = dataset.shard_problems(builder)
  assert len(problems) == 1 and problems[0].startswith(shard + ':')
  config = config_lib.load_sibling(
      os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'x'),
      'default.py')
  config.update(data_dir=data_dir, image_size=(24, 20), batch_size=8,
                eval_batch_size=8)
  with pytest.raises(dataset.DataError) as error:
    list(input_pipeline.eval_iterator(config, builder, sharding.make_mesh(),
                                      'train'))
  assert shard in str(error.value) and '--overwrite' in str(error.value)


def test_garbage_metadata_is_a_data_error(damaged_copy):
  data_dir, _ = damaged_copy
  info = os.path.join(dataset.dataset_dir(data_dir), 'dataset_info.json')
  with open(info, 'w') as f:
    f.write('{not json')
  with pytest.raises(dataset.DataError, match='dataset_info|metadata'):
    dataset.load_builder(data_dir)
