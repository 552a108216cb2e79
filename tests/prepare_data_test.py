"""Tests for gender_jax.prepare_data: raw folders and original shards -> TFDS."""

import collections
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from gender_jax import dataset
from gender_jax import prepare_data
from gender_jax import synthetic

SIZE = (24, 20)
COUNTS = {'Train': (9, 12), 'Validation': (5, 4), 'Test': (3, 4)}
ORIGINAL_SPEC = {'images': tf.io.FixedLenFeature([], tf.string),
                 'label': tf.io.FixedLenFeature([], tf.int64)}


def _expected(path):
  """The test's own decode + resize of one raw file."""
  with Image.open(path) as image:
    image = image.convert('RGB').resize((SIZE[1], SIZE[0]), Image.BILINEAR)
    return np.asarray(image, np.int16)


def _load(path, split):
  builder = tfds.builder_from_directory(path)
  return list(tfds.as_numpy(builder.as_dataset(split)))


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('raw'))
  labels = synthetic.make_raw_dataset(root, COUNTS, seed=3)
  broken = synthetic.add_broken_files(os.path.join(root, 'Train', 'Male'))
  broken.update(synthetic.add_broken_files(
      os.path.join(root, 'Validation', 'Female')))
  return root, labels, broken


@pytest.fixture(scope='module')
def prepared(raw, tmp_path_factory):
  root, _, _ = raw
  out = str(tmp_path_factory.mktemp('out'))
  result = prepare_data.prepare_raw(root, out, image_size=SIZE, num_shards=3,
                                    num_workers=2, show_progress=False)
  return out, result


def test_synthetic_tree_mixes_sizes_and_modes(raw):
  _, labels, _ = raw
  modes, sizes, formats = set(), set(), set()
  for path in labels:
    with Image.open(path) as image:
      modes.add(image.mode)
      sizes.add(image.size)
      formats.add(image.format)
  assert {'RGB', 'L', 'RGBA', 'P', 'CMYK', 'LA'} <= modes
  assert len(sizes) >= 3 and formats == {'JPEG', 'PNG'}


def test_round_trip_counts_labels_pixels(raw, prepared):
  root, labels, broken = raw
  out, result = prepared
  assert result.counts == {
      split: {'female': f, 'male': m} for split, (f, m) in
      zip(('train', 'validation', 'test'), COUNTS.values())}
  assert sorted(p for p, _ in result.skipped) == sorted(broken)
  builder = dataset.load_builder(out)
  assert builder.info.features['label'].names == ['female', 'male']
  for split, folder in zip(('train', 'validation', 'test'), COUNTS):
    assert builder.info.splits[split].num_examples == sum(COUNTS[folder])
    assert builder.info.splits[split].num_shards == 3
    files = [p for p in labels if p.startswith(os.path.join(root, folder, ''))]
    expected = np.stack([_expected(p) for p in files])
    matched = []
    for example in _load(result.output_dir, split):
      assert example['images'].shape == (*SIZE, 3)
      diff = np.abs(expected - example['images']).max(axis=(1, 2, 3))
      i = int(np.argmin(diff))
      assert diff[i] <= 1, (split, diff[i])
      assert example['label'] == labels[files[i]]
      matched.append(i)
    assert sorted(matched) == list(range(len(files)))   # Each file once.
  male = [labels[p] for p in labels if os.sep + 'Male' + os.sep in p]
  assert set(male) == {1}


def test_shards_are_original_format_and_mix_classes(prepared):
  _, result = prepared
  shards = sorted(f for f in os.listdir(result.output_dir)
                  if f.startswith('gender_faces-train.tfrecord'))
  assert shards == [f'gender_faces-train.tfrecord-0000{i}-of-00003'
                    for i in range(3)]
  labels = []
  for raw_record in tf.data.TFRecordDataset(
      os.path.join(result.output_dir, shards[0])):
    example = tf.io.parse_single_example(raw_record, ORIGINAL_SPEC)
    image = tf.io.parse_tensor(example['images'], tf.uint8)
    assert image.dtype == tf.uint8 and image.shape == (*SIZE, 3)
    assert example['images'].numpy() == tf.io.serialize_tensor(image).numpy()
    labels.append(int(example['label']))
  assert set(labels) == {0, 1}


def test_broken_files_logged_by_name(raw, tmp_path, caplog):
  root, _, broken = raw
  with caplog.at_level(logging.WARNING, logger='gender_jax.prepare_data'):
    result = prepare_data.prepare_raw(root, str(tmp_path), image_size=SIZE,
                                      num_workers=1, show_progress=False)
  for path in broken:
    assert f'skipped {path}: ' in caplog.text
  reasons = dict(result.skipped)
  assert 'empty file' in reasons[os.path.join(
      root, 'Train', 'Male', 'broken_empty.jpg')]
  assert 'truncated' in reasons[os.path.join(
      root, 'Train', 'Male', 'broken_truncated.jpg')]
  assert f'skipped {len(broken)} file(s)' in result.summary()


def test_refuses_existing_then_overwrites_atomically(tmp_path):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Val': (1, 1)})
  out = str(tmp_path / 'out')
  first = prepare_data.prepare_raw(root, out, image_size=SIZE, num_workers=1,
                                   show_progress=False)
  with pytest.raises(FileExistsError, match='--overwrite'):
    prepare_data.prepare_raw(root, out, image_size=SIZE, num_workers=1)
  root = str(tmp_path / 'raw2')
  synthetic.make_raw_dataset(root, {'Train': (3, 2), 'Val': (1, 1)})
  prepare_data.prepare_raw(root, out, image_size=(20, 16), num_workers=1,
                           overwrite=True, show_progress=False)
  builder = dataset.load_builder(out)
  assert builder.info.splits['train'].num_examples == 5
  assert builder.info.features['images'].shape == (20, 16, 3)
  assert os.listdir(os.path.dirname(first.output_dir)) == ['1.0.0']


def test_failed_run_leaves_nothing_that_loads(tmp_path, monkeypatch):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Valid': (1, 1)})
  out = str(tmp_path / 'out')

  def fail(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(prepare_data, '_write_metadata', fail)
  with pytest.raises(KeyboardInterrupt):
    prepare_data.prepare_raw(root, out, image_size=SIZE, num_workers=1,
                             show_progress=False)
  assert os.listdir(os.path.join(out, 'gender_faces')) == []
  with pytest.raises(FileNotFoundError):
    dataset.load_builder(out)


def test_aliases_case_insensitive(tmp_path):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'training': (2, 1), 'VALID': (1, 1)})
  os.rename(os.path.join(root, 'training', 'Male'),
            os.path.join(root, 'training', 'man'))
  os.rename(os.path.join(root, 'training', 'Female'),
            os.path.join(root, 'training', 'WOMAN'))
  result = prepare_data.prepare_raw(root, str(tmp_path / 'out'),
                                    image_size=SIZE, num_workers=1,
                                    show_progress=False)
  assert result.counts == {'train': {'female': 2, 'male': 1},
                           'validation': {'female': 1, 'male': 1}}


@pytest.mark.parametrize('case', ['no_validation', 'empty_class',
                                  'missing_class', 'flat', 'not_a_dir'])
def test_bad_layout_names_path_and_layout(tmp_path, case):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Validation': (1, 1)})
  bad = root
  if case == 'no_validation':
    shutil.rmtree(os.path.join(root, 'Validation'))
  elif case == 'empty_class':
    bad = os.path.join(root, 'Validation', 'Male')
    shutil.rmtree(bad)
    os.makedirs(bad)
  elif case == 'missing_class':
    bad = os.path.join(root, 'Train')
    shutil.rmtree(os.path.join(bad, 'Female'))
  elif case == 'flat':
    bad = os.path.join(root, 'Train', 'Male')
  elif case == 'not_a_dir':
    bad = os.path.join(root, 'nothing')
  with pytest.raises(prepare_data.LayoutError) as error:
    prepare_data.prepare_raw(bad if case in ('flat', 'not_a_dir') else root,
                             str(tmp_path / 'out'), image_size=SIZE,
                             num_workers=1)
  assert bad in str(error.value)
  assert 'Expected layout' in str(error.value)
  assert not os.path.exists(str(tmp_path / 'out' / 'gender_faces' / '1.0.0'))


def _write_original_shards(folder, rng):
  """Shards as the original project wrote them; returns {split: examples}."""
  os.makedirs(folder)
  layout = {('train', 'male'): [4, 3], ('train', 'female'): [5],
            ('valid', 'male'): [2], ('valid', 'female'): [3],
            ('test', 'female'): [1], ('test', 'male'): [2]}
  written = collections.defaultdict(list)
  for (split, cls), lengths in layout.items():
    for i, n in enumerate(lengths):
      name = f'{split}_{cls}.tfrecord-{i + 1:02d}-of-{len(lengths):02d}'
      with tf.io.TFRecordWriter(os.path.join(folder, name)) as writer:
        for _ in range(n):
          image = rng.integers(0, 256, (*SIZE, 3), np.uint8)
          label = int(cls == 'male')
          writer.write(tf.train.Example(features=tf.train.Features(feature={
              'images': tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[tf.io.serialize_tensor(image).numpy()])),
              'label': tf.train.Feature(
                  int64_list=tf.train.Int64List(value=[label]))
          })).SerializeToString())
          written[split].append((image.tobytes(), label))
  with open(os.path.join(folder, 'README.txt'), 'w') as f:
    f.write('not a shard')
  return written


@pytest.mark.parametrize('copy', [False, True])
def test_wrap_original_shards_gives_same_examples(tmp_path, copy):
  written = _write_original_shards(str(tmp_path / 'orig'),
                                   np.random.default_rng(0))
  result = prepare_data.wrap_tfrecords(str(tmp_path / 'orig'),
                                       str(tmp_path / 'out'), copy=copy)
  assert result.counts == {'train': {'female': 5, 'male': 7},
                           'validation': {'female': 3, 'male': 2},
                           'test': {'female': 1, 'male': 2}}
  assert result.image_size == SIZE
  shard = os.path.join(result.output_dir,
                       'gender_faces-train.tfrecord-00000-of-00003')
  assert os.path.islink(shard) != copy
  builder = dataset.load_builder(str(tmp_path / 'out'))
  for split, original in (('train', 'train'), ('validation', 'valid'),
                          ('test', 'test')):
    assert builder.info.splits[split].num_examples == len(written[original])
    got = [(ex['images'].tobytes(), int(ex['label']))
           for ex in _load(result.output_dir, split)]
    assert sorted(got) == sorted(written[original])


def test_wrap_rejects_bad_names_and_mislabelled_shards(tmp_path):
  folder = str(tmp_path / 'orig')
  _write_original_shards(folder, np.random.default_rng(0))
  os.rename(os.path.join(folder, 'valid_male.tfrecord-01-of-01'),
            os.path.join(folder, 'valid_female.tfrecord-02-of-02'))
  with pytest.raises(ValueError, match='valid_female.tfrecord-02-of-02.*'
                     'name says female'):
    prepare_data.wrap_tfrecords(folder, str(tmp_path / 'out'))
  os.rename(os.path.join(folder, 'valid_female.tfrecord-02-of-02'),
            os.path.join(folder, 'junk.tfrecord'))
  with pytest.raises(prepare_data.LayoutError, match='junk.tfrecord'):
    prepare_data.wrap_tfrecords(folder, str(tmp_path / 'out'))
  assert not os.path.exists(str(tmp_path / 'out' / 'gender_faces' / '1.0.0'))


def test_script_wraps_shards_and_rejects_two_sources(tmp_path):
  script = os.path.join(os.path.dirname(__file__), os.pardir, 'scripts',
                        'prepare_data.py')
  _write_original_shards(str(tmp_path / 'orig'), np.random.default_rng(0))
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  run = lambda *flags: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, script, f'--data_dir={tmp_path / "out"}', *flags],
      capture_output=True, text=True, env=env)
  out = run(f'--tfrecord_dir={tmp_path / "orig"}', '--copy')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'train: 12 examples (female 5, male 7)' in out.stderr
  assert dataset.load_builder(str(tmp_path / 'out')).info.splits[
      'validation'].num_examples == 5
  out = run(f'--tfrecord_dir={tmp_path / "orig"}', f'--raw_dir={tmp_path}')
  assert out.returncode != 0
  assert 'exactly one of --raw_dir or --tfrecord_dir' in out.stderr
