"""Tests for gender_jax.input_pipeline on a tiny generated dataset."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gender_jax import config_lib
from gender_jax import dataset
from gender_jax import errors
from gender_jax import input_pipeline
from gender_jax import sharding
from gender_jax import synthetic

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')
COUNTS = {'Train': (21, 19), 'Validation': (9, 8)}     # 40 train, 17 val.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  synthetic.make_tfds_dataset(path, image_size=(24, 20), counts=COUNTS)
  return path


def _config(data_dir, **overrides):
  config = config_lib.load_sibling(os.path.join(CONFIGS, 'default.py'),
                                   'default.py')
  config.data_dir = data_dir
  config.image_size = (24, 20)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.shuffle_buffer = 64
  config.update(overrides)
  return config


def _labels_in_order(builder, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return [int(ex['label']) for ex in tfds.as_numpy(builder.as_dataset(split))]


def test_train_epoch_shapes_steps_and_repeat(data_dir):
  config = _config(data_dir)
  builder = dataset.load_builder(data_dir)
  mesh = sharding.make_mesh()
  assert input_pipeline.train_steps_per_epoch(config, builder) == 40 * 2 // 8
  batches = list(input_pipeline.train_iterator(config, builder, mesh, epoch=0))
  assert len(batches) == 10
  for batch in batches:
    assert isinstance(batch['image'], jax.Array)
    assert batch['image'].shape == (8, 24, 20, 3)
    assert batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (8,)
  labels = np.concatenate([np.asarray(b['label']) for b in batches])
  assert np.bincount(labels).tolist() == [42, 38]   # Each example twice.


def test_train_deterministic_per_epoch_and_resumable(data_dir):
  config = _config(data_dir, repeat=1)
  builder = dataset.load_builder(data_dir)
  mesh = sharding.make_mesh()

  def images(epoch, start_step=0):
    return [np.asarray(b['image']) for b in input_pipeline.train_iterator(
        config, builder, mesh, epoch, start_step)]
  epoch1 = images(1)
  assert len(epoch1) == 5
  for a, b in zip(epoch1, images(1)):
    np.testing.assert_array_equal(a, b)
  resumed = images(1, start_step=3)
  assert len(resumed) == 2
  for a, b in zip(epoch1[3:], resumed):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(epoch1, images(2)))


def test_steps_per_epoch_cap_and_cache(data_dir):
  config = _config(data_dir, steps_per_epoch=3, cache=True)
  builder = dataset.load_builder(data_dir)
  mesh = sharding.make_mesh()
  assert input_pipeline.train_steps_per_epoch(config, builder) == 3
  for epoch in range(2):
    assert len(list(input_pipeline.train_iterator(
        config, builder, mesh, epoch))) == 3


@pytest.mark.parametrize('n,batch', [(1, 8), (7, 8), (8, 8), (17, 8),
                                     (17, 4), (40, 16), (40, 64)])
def test_eval_covers_every_example_once(data_dir, n, batch):
  config = _config(data_dir, eval_batch_size=batch)
  builder = dataset.load_builder(data_dir)
  split = f'train[:{n}]'
  assert input_pipeline.num_examples(builder, split) == n
  batches = list(input_pipeline.eval_iterator(
      config, builder, sharding.make_mesh(), split))
  assert len(batches) == math.ceil(n / batch)
  assert input_pipeline.eval_steps(config, builder, split) == len(batches)
  mask = np.concatenate([np.asarray(b['mask']) for b in batches])
  labels = np.concatenate([np.asarray(b['label']) for b in batches])
  assert mask.dtype == bool and mask.sum() == n
  assert mask[:n].all()                       # Padding only at the end.
  assert labels[mask].tolist() == _labels_in_order(builder, split)
  images = np.concatenate([np.asarray(b['image']) for b in batches])
  assert not images[~mask].any()


def test_eval_steps_cap_and_unknown_split(data_dir):
  config = _config(data_dir, eval_steps=1)
  builder = dataset.load_builder(data_dir)
  batches = list(input_pipeline.eval_iterator(
      config, builder, sharding.make_mesh(), 'validation'))
  assert len(batches) == 1
  assert input_pipeline.num_examples(builder, 'train[:10]+validation') == 27
  with pytest.raises(errors.UserError, match="'test' is not in the dataset"):
    input_pipeline.num_examples(builder, 'train+test')


def test_resizes_when_config_size_differs(data_dir):
  config = _config(data_dir, image_size=(16, 12))
  builder = dataset.load_builder(data_dir)
  batch = next(input_pipeline.eval_iterator(
      config, builder, sharding.make_mesh(), 'validation'))
  assert batch['image'].shape == (8, 16, 12, 3)
  assert batch['image'].dtype == np.uint8


_SHARDED_CHECK = """
import jax, numpy as np, os, sys
sys.path.insert(0, {tests!r})
from input_pipeline_test import _config
from gender_jax import dataset, input_pipeline, sharding
assert jax.device_count() == 8, jax.devices()
config = _config({data_dir!r}, batch_size=16, eval_batch_size=16)
builder = dataset.load_builder({data_dir!r})
mesh = sharding.make_mesh()
for batch in [next(input_pipeline.train_iterator(config, builder, mesh, 0)),
              next(input_pipeline.eval_iterator(config, builder, mesh,
                                                'validation'))]:
  for x in batch.values():
    assert x.shape[0] == 16, x.shape
    assert x.sharding.spec == jax.sharding.PartitionSpec('data'), x.sharding
    shards = x.addressable_shards
    assert len({{s.device for s in shards}}) == 8
    assert all(s.data.shape[0] == 2 for s in shards)
masks = [np.asarray(b['mask']) for b in input_pipeline.eval_iterator(
    config, builder, mesh, 'validation')]
print('ok', len(masks), int(np.concatenate(masks).sum()))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batches_sharded_over_eight_devices(data_dir):
  code = _SHARDED_CHECK.format(tests=os.path.dirname(__file__),
                               data_dir=data_dir)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-3:] == ['ok', '2', '17']


@pytest.mark.parametrize('n,batch', [(17, 6), (40, 3), (2, 3)])
def test_eval_over_three_processes_covers_each_example_once(
    data_dir, monkeypatch, n, batch):
  """Each process reads its slice; together they see every example once."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, eval_batch_size=batch)
  builder = dataset.load_builder(data_dir)
  split = f'train[:{n}]'
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  seen, num_batches = [], set()
  for index in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    batches = list(tfds.as_numpy(
        input_pipeline.eval_dataset(config, builder, split)))
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape[0] == batch // 3
      seen += [img.tobytes() for img in b['image'][b['mask']]]
  assert num_batches == {math.ceil(math.ceil(n / 3) / (batch // 3))}
  everything = [ex['images'].tobytes() for ex in tfds.as_numpy(
      builder.as_dataset(split))]
  assert sorted(seen) == sorted(everything)


def test_train_over_three_processes_disjoint_equal_steps(data_dir, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, batch_size=6, repeat=1)
  builder = dataset.load_builder(data_dir)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  assert input_pipeline.train_steps_per_epoch(config, builder) == 40 // 3 // 2
  seen = []
  for index in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    batches = list(tfds.as_numpy(
        input_pipeline.train_dataset(config, builder, epoch=0)))
    assert len(batches) == 6 and batches[0]['image'].shape[0] == 2
    seen += [img.tobytes() for b in batches for img in b['image']]
  assert len(set(seen)) == len(seen) == 36


@pytest.fixture(scope='module')
def two_sources_dir(tmp_path_factory):
  """A dataset of two folder sources: 'big' (40 train) and 'small' (20)."""
  from gender_jax import prepare_data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('two_sources')
  specs = []
  for seed, (name, counts) in enumerate(
      [('big', {'Train': (20, 20), 'Validation': (3, 3), 'Test': (2, 2)}),
       ('small', {'Train': (10, 10), 'Validation': (2, 3), 'Test': (1, 2)})]):
    raw = str(root / f'raw_{name}')
    synthetic.make_raw_dataset(raw, counts=counts, seed=seed)
    specs.append(f'{name}=folders:{raw}')
  prepare_data.prepare_sources(specs, str(root / 'tfds'), image_size=(24, 20),
                               num_workers=1, show_progress=False)
  return str(root / 'tfds')


def _image_set(builder, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return {ex['images'].tobytes()
          for ex in tfds.as_numpy(builder.as_dataset(split))}


def test_part_names_the_union_of_source_splits(two_sources_dir):
  config = _config(two_sources_dir, repeat=1)
  builder = dataset.load_builder(two_sources_dir)
  assert dataset.resolve_split(builder, 'train') == 'train_big+train_small'
  assert dataset.resolve_split(builder, 'test_small') == 'test_small'
  assert input_pipeline.num_examples(builder, 'train') == 60
  assert input_pipeline.num_examples(builder, 'validation') == 11
  assert input_pipeline.train_steps_per_epoch(config, builder) == 60 // 8
  batches = list(input_pipeline.eval_iterator(
      config, builder, sharding.make_mesh(), 'test'))
  assert sum(int(np.asarray(b['mask']).sum()) for b in batches) == 7
  with pytest.raises(errors.UserError, match='slice its parts'):
    dataset.resolve_split(builder, 'train[:10]')
  with pytest.raises(errors.UserError, match="'nosuch' is not in the dataset"):
    input_pipeline.num_examples(builder, 'nosuch')


def test_source_weights_hold_over_many_batches(two_sources_dir):
  builder = dataset.load_builder(two_sources_dir)
  small = _image_set(builder, 'train_small')
  big = _image_set(builder, 'train_big')
  config = _config(two_sources_dir, source_weights='big:1,small:3',
                   repeat=20, shuffle_buffer=16)
  mesh = sharding.make_mesh()
  steps = input_pipeline.train_steps_per_epoch(config, builder)
  assert steps == 60 * 20 // 8           # The epoch length does not change.
  images = [img.tobytes() for b in input_pipeline.train_iterator(
      config, builder, mesh, epoch=0) for img in np.asarray(b['image'])]
  from_small = sum(img in small for img in images)
  assert from_small + sum(img in big for img in images) == len(images)
  # 1,200 draws with p = 0.75: the standard deviation is 0.0125.
  assert abs(from_small / len(images) - 0.75) < 0.04
  resumed = [img.tobytes() for b in input_pipeline.train_iterator(
      config, builder, mesh, epoch=0, start_step=steps - 3)
             for img in np.asarray(b['image'])]
  assert resumed == images[-3 * 8:]


def test_source_weights_errors(two_sources_dir, data_dir):
  builder = dataset.load_builder(two_sources_dir)
  for weights, message in [('big:1', r"no weight for \['small'\]"),
                           ('big:1,small:1,other:1', r"no source \['other'\]")]:
    config = _config(two_sources_dir, source_weights=weights)
    with pytest.raises(errors.UserError, match=message):
      input_pipeline.train_source_weights(config, builder)
  config = _config(data_dir, source_weights='folders:1')
  with pytest.raises(errors.UserError, match='whole source splits'):
    input_pipeline.train_source_weights(config, dataset.load_builder(data_dir))
  with pytest.raises(config_lib.ConfigError, match='source_weights'):
    config_lib.validate(_config(data_dir, source_weights='big=1'))
