"""Tests for gender_jax.prepare_data: labelled sources and original shards ->
TFDS."""

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from gender_jax import dataset
from gender_jax import errors
from gender_jax import image_io
from gender_jax import labels as labels_lib
from gender_jax import prepare_data
from gender_jax import sources
from gender_jax import synthetic

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, 'scripts',
                      'prepare_data.py')
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


def _run_script(*flags):
  """Runs scripts/prepare_data.py in the environment a user has (no TF_*)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True,
                        text=True, env=env, check=False)


def _assert_user_error(out, *words):
  """Exit status 2 and one line on stderr naming `words`, no traceback."""
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert lines[0].startswith('prepare_data.py: error: '), lines
  for word in words:
    assert word in lines[0], (word, lines[0])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_wraps_shards_and_rejects_two_sources(tmp_path):
  _write_original_shards(str(tmp_path / 'orig'), np.random.default_rng(0))
  out = _run_script(f'--data_dir={tmp_path / "out"}',
                    f'--tfrecord_dir={tmp_path / "orig"}', '--copy')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'train: 12 examples (female 5, male 7)' in out.stdout
  assert dataset.load_builder(str(tmp_path / 'out')).info.splits[
      'validation'].num_examples == 5
  out = _run_script(f'--data_dir={tmp_path / "out"}',
                    f'--tfrecord_dir={tmp_path / "orig"}',
                    f'--raw_dir={tmp_path}')
  _assert_user_error(out, '--raw_dir or --source', '--tfrecord_dir alone')


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_summary_once_on_stdout_without_library_noise(tmp_path):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (3, 3), 'Validation': (2, 2)})
  out = _run_script(f'--raw_dir={root}', f'--data_dir={tmp_path / "out"}',
                    '--image_height=24', '--image_width=20',
                    '--num_workers=2')
  assert out.returncode == 0, out.stderr[-2000:]
  summary = 'train: 6 examples (female 3, male 3)'
  assert out.stdout.count(summary) == 1, out.stdout
  assert summary not in out.stderr
  for noise in ('oneDNN', 'cpu_feature_guard', "initialize backend 'tpu'",
                'absl::InitializeLog'):
    assert noise not in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize('case', ['no_validation', 'empty_class', 'unwritable',
                                  'exists', 'no_data_dir'])
def test_script_user_errors_are_one_line_exit_2(tmp_path, case):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (1, 1), 'Validation': (1, 1)})
  flags = [f'--raw_dir={root}', f'--data_dir={tmp_path / "out"}',
           '--image_height=24', '--image_width=20', '--num_workers=1']
  words = []
  if case == 'no_validation':
    shutil.rmtree(os.path.join(root, 'Validation'))
    words = [root, 'no validation folder', 'Expected layout']
  elif case == 'empty_class':
    shutil.rmtree(os.path.join(root, 'Train', 'Male'))
    os.makedirs(os.path.join(root, 'Train', 'Male'))
    words = [os.path.join(root, 'Train', 'Male'), 'class folder is empty']
  elif case == 'unwritable':
    if os.geteuid() == 0:   # Root writes anywhere a mode allows; not in /sys.
      target = '/sys/gender_jax_test_data'
    else:
      target = str(tmp_path / 'read_only')
      os.makedirs(target, mode=0o555)
    flags[1] = f'--data_dir={target}'
    words = ['cannot write', target, 'choose a folder you can write to']
  elif case == 'exists':
    os.makedirs(str(tmp_path / 'out' / 'gender_faces' / '1.0.0'))
    words = ['already exists', '--overwrite']
  elif case == 'no_data_dir':
    del flags[1]
    words = ['--data_dir']
  _assert_user_error(_run_script(*flags), *words)


def test_testing_folder_is_the_test_split(tmp_path, caplog):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 1), 'Validation': (1, 1),
                                    'Testing': (1, 2)})
  with caplog.at_level(logging.WARNING, logger='gender_jax.prepare_data'):
    result = prepare_data.prepare_raw(root, str(tmp_path / 'out'),
                                      image_size=SIZE, num_workers=1,
                                      show_progress=False)
  assert result.counts['test'] == {'female': 1, 'male': 2}
  assert 'ignoring' not in caplog.text


def test_links_folders_and_fifos_are_skipped_with_reasons(tmp_path):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Validation': (1, 1)})
  male = os.path.join(root, 'Train', 'Male')
  os.symlink('loop.jpg', os.path.join(male, 'loop.jpg'))          # -> itself
  os.symlink('a.jpg', os.path.join(male, 'b.jpg'))
  os.symlink('b.jpg', os.path.join(male, 'a.jpg'))                # a <-> b
  os.symlink('gone.jpg', os.path.join(male, 'dangling.jpg'))
  os.makedirs(os.path.join(male, 'more'))
  os.mkfifo(os.path.join(male, 'pipe.jpg'))
  result = prepare_data.prepare_raw(root, str(tmp_path / 'out'),
                                    image_size=SIZE, num_workers=1,
                                    show_progress=False)
  reasons = {os.path.basename(p): r for p, r in result.skipped}
  assert result.counts['train'] == {'female': 2, 'male': 2}
  assert set(reasons) == {'loop.jpg', 'a.jpg', 'b.jpg', 'dangling.jpg',
                          'more', 'pipe.jpg'}
  assert reasons['loop.jpg'].startswith('OSError: [Errno 40]')
  assert reasons['dangling.jpg'] == (
      "FileNotFoundError: broken symbolic link to 'gone.jpg'")
  assert reasons['more'].startswith('IsADirectoryError')
  assert reasons['pipe.jpg'] == 'ValueError: not a regular file'
  assert 'skipped 6 file(s)' in result.summary()


_SLOW_DRIVER = """
import sys
import time
from gender_jax import image_io
from gender_jax import prepare_data

_decode = image_io.decode


def slow_decode(*args):   # Also in the spawned workers.
  time.sleep(0.5)
  return _decode(*args)


image_io.decode = slow_decode
if __name__ == '__main__':
  prepare_data.prepare_raw(sys.argv[1], sys.argv[2], image_size=(24, 20),
                           num_shards=4, num_workers=2, show_progress=False)
"""


def _children(pid):
  """Pids of the live (not zombie) child processes of `pid`, from /proc."""
  children = []
  for name in os.listdir('/proc'):
    try:
      with open(f'/proc/{name}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
      continue
    if fields[0] != 'Z' and int(fields[1]) == pid:
      children.append(int(name))
  return children


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs /proc')
def test_kill_9_leaves_no_workers_and_rerun_cleans_up(tmp_path, caplog):
  root, out = str(tmp_path / 'raw'), str(tmp_path / 'out')
  synthetic.make_raw_dataset(root, {'Train': (12, 12), 'Validation': (4, 4)})
  driver = tmp_path / 'slow_prepare.py'
  driver.write_text(textwrap.dedent(_SLOW_DRIVER))
  env = {**os.environ, 'PYTHONPATH': os.path.join(os.path.dirname(__file__),
                                                  os.pardir)}
  run = subprocess.Popen([sys.executable, str(driver), root, out], env=env,
                         stderr=subprocess.DEVNULL)
  tmp = os.path.join(out, 'gender_faces', f'1.0.0.tmp-{run.pid}')
  deadline = time.time() + 240
  while not (os.path.isdir(tmp) and len(os.listdir(tmp)) >= 2):
    assert run.poll() is None and time.time() < deadline   # Workers writing.
    time.sleep(0.2)
  workers = _children(run.pid)
  assert len(workers) >= 2, workers
  os.kill(run.pid, signal.SIGKILL)
  run.wait()
  deadline = time.time() + 30
  while any(map(_alive, workers)) and time.time() < deadline:
    time.sleep(0.2)
  survivors = [pid for pid in workers if _alive(pid)]
  for pid in survivors:   # Free their memory before failing.
    os.kill(pid, signal.SIGKILL)
  assert not survivors
  assert os.path.isdir(tmp)
  with caplog.at_level(logging.WARNING, logger='gender_jax.prepare_data'):
    result = prepare_data.prepare_raw(root, out, image_size=SIZE,
                                      num_workers=1, show_progress=False)
  assert f'removing {tmp}, left by process {run.pid}' in caplog.text
  assert sorted(os.listdir(os.path.join(out, 'gender_faces'))) == ['1.0.0']
  assert result.num_examples() == 32


def test_stale_old_dataset_is_restored_when_the_new_one_is_missing(tmp_path):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Validation': (1, 1)})
  out = str(tmp_path / 'out')
  final = prepare_data.prepare_raw(root, out, image_size=SIZE, num_workers=1,
                                   show_progress=False).output_dir
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  os.rename(final, f'{final}.old-{dead_pid}')   # Died inside _commit.
  os.makedirs(f'{final}.tmp-{dead_pid}')
  with pytest.raises(FileExistsError):   # The restored dataset is kept.
    prepare_data.prepare_raw(root, out, image_size=SIZE, num_workers=1)
  assert sorted(os.listdir(os.path.dirname(final))) == ['1.0.0']
  assert dataset.load_builder(out).info.splits['train'].num_examples == 4


# ------------------------------------------------------ several sources --

FRACTIONS = {'val_fraction': 0.25, 'test_fraction': 0.25}
FOLDER_COUNTS = {'Train': (3, 2), 'Validation': (1, 2), 'Test': (2, 1)}


@pytest.fixture(scope='module')
def utkface_dir(tmp_path_factory):
  """UTKFace-named JPEGs, 2 of each gender in each hash split, and one
  malformed name; returns (folder, {path: (label, split)})."""
  folder = str(tmp_path_factory.mktemp('utkface'))
  rng = np.random.default_rng(7)
  want = collections.Counter({(s, y): 2 for s in labels_lib.SPLITS
                              for y in (0, 1)})
  files, i = {}, 0
  while +want:
    male = i % 2 == 0
    path = os.path.join(folder, f'{i % 90 + 1}_{0 if male else 1}_{i % 5}_'
                        f'20170101{i:09d}.jpg.chip.jpg')
    Image.fromarray(synthetic.face_image(rng, male, (30, 26))).save(
        path, quality=90)
    split = sources.hash_split(sources.file_digest(path), **FRACTIONS)
    if want[split, int(male)] > 0:
      want[split, int(male)] -= 1
      files[path] = (int(male), split)
    else:
      os.remove(path)
    i += 1
  shutil.copyfile(next(iter(files)), os.path.join(folder, 'unnamed.jpg'))
  return folder, files


@pytest.fixture(scope='module')
def two_sources(utkface_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folders'))
  synthetic.make_raw_dataset(root, FOLDER_COUNTS, seed=4)
  out = str(tmp_path_factory.mktemp('out2'))
  result = prepare_data.prepare_sources(
      [f'folders:{root}', f'utkface:{utkface_dir[0]}'], out, SIZE,
      num_workers=1, show_progress=False, **FRACTIONS)
  return root, out, result


def test_two_sources_give_a_split_per_source_and_part(two_sources):
  root, out, result = two_sources
  folder_counts = {f'{part}_folders': {'female': f, 'male': m} for part, (f, m)
                   in zip(labels_lib.SPLITS, FOLDER_COUNTS.values())}
  assert result.counts == {
      **folder_counts, **{f'{part}_utkface': {'female': 2, 'male': 2}
                          for part in labels_lib.SPLITS}}
  assert list(result.counts) == [f'{part}_{name}' for part in labels_lib.SPLITS
                                 for name in ('folders', 'utkface')]
  (path, reason), = result.skipped
  assert os.path.basename(path) == 'unnamed.jpg'
  assert reason.startswith('not a UTKFace name')
  builder = dataset.load_builder(out)
  for split, by_class in result.counts.items():
    assert builder.info.splits[split].num_examples == sum(by_class.values())
  summary = result.summary()
  assert 'train_utkface: 4 examples (female 2, male 2)' in summary
  assert (f'source folders (folders {root}): train 5, validation 3, test 3'
          in summary)
  assert 'source utkface (utkface ' in summary
  assert 'train 4, validation 4, test 4' in summary


def test_two_sources_metadata_records_sources_and_framing(two_sources,
                                                          utkface_dir):
  root, out, _ = two_sources
  meta = dataset.metadata(dataset.load_builder(out))
  assert meta['sources'] == {
      'folders': {'kind': 'folders', 'path': root, 'counts': {
          part: {'female': f, 'male': m}
          for part, (f, m) in zip(labels_lib.SPLITS, FOLDER_COUNTS.values())}},
      'utkface': {'kind': 'utkface', 'path': utkface_dir[0], 'counts': {
          part: {'female': 2, 'male': 2} for part in labels_lib.SPLITS}}}
  assert (meta['resize'], meta['box_margin'], meta['boxes']) == (
      'stretch', 0.0, None)
  assert (meta['val_fraction'], meta['test_fraction']) == (0.25, 0.25)


def test_part_names_the_union_and_source_test_split_is_its_own(
    two_sources, utkface_dir):
  _, out, _ = two_sources
  builder = dataset.load_builder(out)
  assert dataset.resolve_split(builder, 'train') == (
      'train_folders+train_utkface')
  assert dataset.resolve_split(builder, 'test_utkface') == 'test_utkface'
  assert len(_load(out + '/gender_faces/1.0.0',
                   dataset.resolve_split(builder, 'train'))) == 5 + 4
  with pytest.raises(errors.UserError, match="split 'holdout'"):
    dataset.resolve_split(builder, 'holdout')
  tests = {p: y for p, (y, s) in utkface_dir[1].items() if s == 'test'}
  expected = {image_io.decode(p, SIZE)[0].tobytes(): y
              for p, y in tests.items()}
  got = {ex['images'].tobytes(): int(ex['label'])
         for ex in _load(out + '/gender_faces/1.0.0', 'test_utkface')}
  assert got == expected


def _photos(folder, rng, n=6):
  """n non-square PNGs (40 wide, 60 tall) in `folder`; returns their names."""
  os.makedirs(folder)
  names = []
  for i in range(n):
    names.append(f'p{i}.png')
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), np.uint8)).save(
        os.path.join(folder, names[-1]))
  return names


def test_csv_source_with_boxes_and_crop_frames_like_decode(tmp_path):
  names = _photos(str(tmp_path / 'img'), np.random.default_rng(2))
  listing = tmp_path / 'list.csv'
  listing.write_text('path,label,split\n' + ''.join(
      f'img/{n},{("male", "female")[i % 2]},'
      f'{("train", "train", "validation", "validation", "test", "test")[i]}\n'
      for i, n in enumerate(names)))
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('NAME_ID,X,Y,W,H\nimg/p0,5,8,20,30\nimg/p3,10,20,16,16\n')
  result = prepare_data.prepare_sources(
      [f'csv:{listing}'], str(tmp_path / 'out'), SIZE, resize='crop',
      boxes=str(boxes), box_margin=0.1, num_workers=1, show_progress=False)
  assert result.counts['train'] == {'female': 1, 'male': 1}
  table = image_io.read_boxes(str(boxes))
  for split, chosen in (('train', names[:2]), ('validation', names[2:4])):
    want = sorted(image_io.decode(str(tmp_path / 'img' / n), SIZE, 'crop',
                                  image_io.find_box(table, f'img/{n}'),
                                  0.1)[0].tobytes() for n in chosen)
    got = sorted(ex['images'].tobytes()
                 for ex in _load(result.output_dir, split))
    assert got == want
  plain = image_io.decode(str(tmp_path / 'img' / names[0]), SIZE, 'crop')[0]
  assert plain.tobytes() not in got + want
  meta = dataset.metadata(dataset.load_builder(str(tmp_path / 'out')))
  assert (meta['resize'], meta['box_margin'], meta['boxes']) == (
      'crop', 0.1, str(boxes))


@pytest.mark.parametrize('case', ['resize', 'margin', 'boxes', 'spec'])
def test_bad_framing_or_spec_is_one_line_error(tmp_path, case):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (1, 1), 'Validation': (1, 1)})
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('NAME_ID,X,Y,W,H\nTrain/Male/00000,1,2,-3,4\n')
  kwargs = {'resize': {'resize': 'fit'}, 'margin': {'box_margin': -0.5},
            'boxes': {'boxes': str(boxes)}, 'spec': {}}[case]
  specs = ['folders' + root] if case == 'spec' else [f'folders:{root}']
  words = {'resize': ["--resize='fit'", 'stretch|crop|pad'],
           'margin': ['--box_margin=-0.5'],
           'boxes': ['--boxes', str(boxes), 'line 2'],
           'spec': ['KIND:PATH']}[case]
  with pytest.raises(prepare_data.LayoutError) as error:
    prepare_data.prepare_sources(specs, str(tmp_path / 'out'), SIZE,
                                 num_workers=1, **kwargs)
  assert '\n' not in str(error.value)
  for word in words:
    assert word in str(error.value), (word, str(error.value))
  assert not os.path.exists(str(tmp_path / 'out' / 'gender_faces' / '1.0.0'))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_takes_several_sources(tmp_path, utkface_dir):
  root = str(tmp_path / 'raw')
  synthetic.make_raw_dataset(root, {'Train': (2, 2), 'Validation': (1, 1)})
  flags = [f'--source=folders:{root}', f'--source=utk=utkface:{utkface_dir[0]}',
           f'--data_dir={tmp_path / "out"}', '--image_height=24',
           '--image_width=20', '--num_workers=1', '--val_fraction=0.25',
           '--test_fraction=0.25', '--resize=pad']
  out = _run_script(*flags)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'train_utk: 4 examples (female 2, male 2)' in out.stdout
  assert 'test_utk: 4 examples' in out.stdout
  assert 'source folders (folders ' in out.stdout
  assert 'source utk (utkface ' in out.stdout
  meta = dataset.metadata(dataset.load_builder(str(tmp_path / 'out')))
  assert meta['resize'] == 'pad' and set(meta['sources']) == {'folders', 'utk'}
  _assert_user_error(_run_script(f'--source=imdb:{root}',
                                 f'--data_dir={tmp_path / "out2"}'),
                     "'imdb:", 'KIND:PATH')


def test_verify_reads_every_record(tmp_path):
  synthetic.make_tfds_dataset(str(tmp_path), image_size=(24, 20))
  assert 'as the metadata says' in prepare_data.verify(str(tmp_path))
  folder = dataset.dataset_dir(str(tmp_path))
  shard = os.path.join(folder, sorted(
      n for n in os.listdir(folder) if '-validation.' in n)[0])
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) - 5)
  with pytest.raises(dataset.DataError, match=f'1 damaged shard.*{shard}'):
    prepare_data.verify(str(tmp_path))


def test_wrap_names_a_truncated_shard(tmp_path):
  folder = str(tmp_path / 'orig')
  _write_original_shards(folder, np.random.default_rng(0))
  shard = os.path.join(folder, 'train_male.tfrecord-02-of-02')
  with open(shard, 'rb+') as f:
    f.truncate(os.path.getsize(shard) - 10)
  with pytest.raises(prepare_data.LayoutError,
                     match=r'train_male.tfrecord-02-of-02: DataLossError'):
    prepare_data.wrap_tfrecords(folder, str(tmp_path / 'out'))
  assert not os.path.exists(str(tmp_path / 'out' / 'gender_faces' / '1.0.0'))
