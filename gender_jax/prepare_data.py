"""Builds the `gender_faces` TFDS dataset from raw folders or original shards.

Two entry points, both writing `<data_dir>/gender_faces/1.0.0/`:

* `prepare_raw`: image folders -> TFRecord shards in the original project's
  format (`images` = `tf.io.serialize_tensor` bytes of a uint8 HxWx3 RGB
  image, `label` = int64, male = 1) + TFDS metadata. Decoding, resizing and
  writing run in worker processes, one whole shard per task.
* `wrap_tfrecords`: the original project's shards (`train_male.tfrecord-01-of-20`
  ...) are linked (or copied) under TFDS shard names and metadata is written;
  images are not decoded or re-encoded.

Output is written to `<version>.tmp-<pid>` and renamed into place, so an
interrupted run never leaves a dataset that loads; a later run removes the
`.tmp-<pid>` folders of runs whose process is gone (e.g. killed with -9).
Worker processes die with the run (Linux parent-death signal, else a
watchdog thread), so a killed run leaves none behind.

Images are decoded by `gender_jax.image_io.decode`, shared with the labeller
(EXIF orientation, 8-bit RGB for every PIL mode, alpha over black, bilinear
resize: rules in `gender_jax.image_io`). Files it cannot decode are skipped,
logged and counted.
"""

import concurrent.futures
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import struct
import threading
import time
from typing import Optional

import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from gender_jax import cli
from gender_jax import dataset
from gender_jax import image_io
from gender_jax import locking

SHUFFLE_SEED = 42
EXAMPLES_PER_SHARD = 1000
SPLIT_ALIASES = {
    'train': ('train', 'training'),
    'validation': ('validation', 'valid', 'val'),
    'test': ('test', 'testing'),
}
REQUIRED_SPLITS = ('train', 'validation')
CLASS_ALIASES = {
    'female': ('female', 'woman', 'women'),
    'male': ('male', 'man', 'men'),
}
EXPECTED_LAYOUT = """Expected layout (names case-insensitive):
  RAW_DIR/Train|Training/Female|Woman/<images>  and  .../Male|Man/<images>
  RAW_DIR/Validation|Valid|Val/Female|Woman/...  and  .../Male|Man/...
  RAW_DIR/Test|Testing/Female|Woman/...  and  .../Male|Man/...   (optional)"""
_SHARD_NAME = re.compile(
    r'^(?P<split>[a-z]+)[_.-](?P<cls>[a-z]+)\.tfrecords?'
    r'(?:-(?P<index>\d+)-of-(?P<total>\d+))?$', re.IGNORECASE)

log = logging.getLogger(__name__)


class LayoutError(cli.UserError, ValueError):
  """An input folder or file this module cannot make a dataset from; the
  message names it and says what to do (scripts: one line, exit status 2)."""


@dataclasses.dataclass
class PrepareResult:
  """What a prepare run wrote.

  counts: split -> {'female': n, 'male': n} examples written.
  skipped: (path, reason) of every input file that was not written.
  """
  output_dir: str
  image_size: tuple
  counts: dict
  skipped: list
  seconds: float

  def num_examples(self, split: Optional[str] = None) -> int:
    splits = [split] if split else list(self.counts)
    return sum(sum(self.counts[s].values()) for s in splits)

  def summary(self) -> str:
    lines = [f'dataset at {self.output_dir} (image size '
             f'{self.image_size[0]}x{self.image_size[1]}), '
             f'{self.seconds:.1f} s:']
    for split, by_class in self.counts.items():
      lines.append(f'  {split}: {sum(by_class.values())} examples ('
                   + ', '.join(f'{c} {n}' for c, n in by_class.items()) + ')')
    lines.append(f'  skipped {len(self.skipped)} file(s)' +
                 ''.join(f'\n    {p}: {r}' for p, r in self.skipped))
    return '\n'.join(lines)


# ---------------------------------------------------------------- raw folders


def _match_alias(name: str, aliases: dict) -> Optional[str]:
  for canonical, names in aliases.items():
    if name.lower() in names:
      return canonical
  return None


def _entries(path: str) -> list:
  """The entries of folder `path` by name; LayoutError if it cannot be read."""
  try:
    return sorted(os.scandir(path), key=lambda e: e.name)
  except OSError as e:
    raise LayoutError(f'cannot read folder {path}: {e.strerror}.') from e


def _is_dir(entry: os.DirEntry) -> bool:
  """`entry.is_dir()`, False for a symbolic-link loop instead of raising."""
  try:
    return entry.is_dir()
  except OSError:
    return False


def _alias_dirs(path: str, aliases: dict, what: str) -> dict:
  """Maps canonical names to the subdirectories of `path` named by aliases."""
  found = {}
  for entry in _entries(path):
    if not _is_dir(entry):
      continue
    canonical = _match_alias(entry.name, aliases)
    if canonical is None:
      log.warning('ignoring folder %s: not a %s folder', entry.path, what)
    elif canonical in found:
      raise LayoutError(
          f'{path}: both {found[canonical]!r} and {entry.name!r} name the '
          f'{canonical} {what}; keep one.\n{EXPECTED_LAYOUT}')
    else:
      found[canonical] = entry.name
  return found


def find_raw_files(raw_dir: str) -> dict:
  """Returns {split: {class: [image paths]}} of a raw folder set.

  Every non-hidden entry of a class folder is listed, including folders,
  broken symbolic links and link loops: `image_io.decode` gives each one that
  is not an image its skip reason. Raises LayoutError naming the path and the
  expected layout when a required split or class folder is missing or empty.
  """
  if not os.path.isdir(raw_dir):
    raise LayoutError(f'{raw_dir} is not a folder.\n{EXPECTED_LAYOUT}')
  splits = _alias_dirs(raw_dir, SPLIT_ALIASES, 'split')
  missing = [s for s in REQUIRED_SPLITS if s not in splits]
  if missing:
    raise LayoutError(
        f'{raw_dir}: no {" or ".join(missing)} folder found (has: '
        f'{sorted(os.listdir(raw_dir))}).\n{EXPECTED_LAYOUT}')
  files = {}
  for split in SPLIT_ALIASES:
    if split not in splits:
      continue
    split_dir = os.path.join(raw_dir, splits[split])
    classes = _alias_dirs(split_dir, CLASS_ALIASES, 'class')
    files[split] = {}
    for cls in dataset.CLASS_NAMES:
      if cls not in classes:
        raise LayoutError(
            f'{split_dir}: no {cls} class folder (has: '
            f'{sorted(os.listdir(split_dir))}).\n{EXPECTED_LAYOUT}')
      class_dir = os.path.join(split_dir, classes[cls])
      paths = [entry.path for entry in _entries(class_dir)
               if not entry.name.startswith('.')]
      if not paths:
        raise LayoutError(f'{class_dir}: class folder is empty.\n'
                          f'{EXPECTED_LAYOUT}')
      files[split][cls] = paths
  return files


def _example(image_bytes: bytes, label: int) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      dataset.IMAGE_KEY: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      dataset.LABEL_KEY: tf.train.Feature(
          int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


@dataclasses.dataclass
class _ShardTask:
  split: str
  path: str
  items: list          # [(image path, label)]
  image_size: tuple


_PROGRESS_EVERY = 50   # Images between progress reports from a worker.
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_worker_progress = None


def _write_shard(task: _ShardTask, report=None):
  """Decodes, resizes and writes one shard; returns (task, counts, skipped).

  `report(n)` is called every few images with the number done since the last
  call (default: the worker's progress queue, if any).
  """
  report = report or (_worker_progress.put if _worker_progress else None)
  counts = [0] * len(dataset.CLASS_NAMES)
  skipped = []
  with tf.io.TFRecordWriter(task.path) as writer:
    for i, (path, label) in enumerate(task.items, 1):
      image, reason = image_io.decode(path, task.image_size)
      if image is None:
        skipped.append((path, reason))
      else:   # Write errors (disk full...) abort the run instead.
        writer.write(_example(dataset.serialize_image(image), label))
        counts[label] += 1
      if report and (i % _PROGRESS_EVERY == 0 or i == len(task.items)):
        report(i % _PROGRESS_EVERY or _PROGRESS_EVERY)
  return task, counts, skipped


def _die_with_parent(parent_pid: int) -> None:
  """Makes this worker process end when the run's process does, even on
  `kill -9` (which runs no clean-up in the parent): Linux's
  PR_SET_PDEATHSIG, else a thread that polls the parent pid."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
      raise OSError(ctypes.get_errno(), 'prctl failed')
  except (OSError, AttributeError):
    def watch():
      while os.getppid() == parent_pid:
        time.sleep(1)
      os._exit(1)  # pylint: disable=protected-access
    threading.Thread(target=watch, daemon=True).start()
  if os.getppid() != parent_pid:   # The parent died before prctl.
    os._exit(1)  # pylint: disable=protected-access


def _init_worker(progress_queue, parent_pid: int):
  global _worker_progress
  _die_with_parent(parent_pid)
  _worker_progress = progress_queue
  tf.config.set_visible_devices([], 'GPU')
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _run_tasks(tasks, num_workers: int, total: int, show_progress: bool):
  """Yields `_write_shard` results, in parallel processes when asked."""
  bar = tqdm.tqdm(total=total, unit='img', disable=not show_progress,
                  desc='prepare', smoothing=0.1)
  with bar:
    if num_workers <= 1 or len(tasks) <= 1:
      for task in tasks:
        yield _write_shard(task, bar.update)
      return
    # 'spawn': workers must not inherit the parent's running TF runtime.
    context = multiprocessing.get_context('spawn')
    progress = context.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_init_worker,
        initargs=(progress, os.getpid()))
    try:
      pending = {pool.submit(_write_shard, t) for t in tasks}
      while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=0.25,
            return_when=concurrent.futures.FIRST_COMPLETED)
        while not progress.empty():
          bar.update(progress.get())
        for future in done:
          yield future.result()
      bar.update(bar.total - bar.n)   # Reports still queued when all ended.
    finally:
      pool.shutdown(cancel_futures=True)


def _shard_name(split: str, index: int, total: int) -> str:
  return f'{dataset.NAME}-{split}.tfrecord-{index:05d}-of-{total:05d}'


def prepare_raw(raw_dir: str, data_dir: str, image_size=(218, 178),
                num_shards: Optional[int] = None,
                num_workers: Optional[int] = None, overwrite: bool = False,
                show_progress: bool = True) -> PrepareResult:
  """Converts raw image folders into the `gender_faces` TFDS dataset.

  Args:
    raw_dir: folder with Train/, Validation/ and optionally Test/, each with
      Female/ and Male/ (aliases: see EXPECTED_LAYOUT).
    data_dir: TFDS data_dir; the dataset goes to data_dir/gender_faces/1.0.0.
    image_size: (height, width) every image is resized to.
    num_shards: shards per split (default: one per ~1000 images).
    num_workers: processes decoding and writing (default: CPU count).
    overwrite: replace an existing dataset (atomically) instead of refusing.
    show_progress: tqdm progress bar.
  """
  start = time.time()
  image_size = tuple(int(s) for s in image_size)
  final = dataset.dataset_dir(data_dir)
  _check_target(final, overwrite)
  files = find_raw_files(raw_dir)
  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0))
  tmp = _make_tmp(final)
  try:
    tasks = []
    for split, by_class in files.items():
      items = sorted((p, label) for label, cls in enumerate(dataset.CLASS_NAMES)
                     for p in by_class[cls])
      random.Random(SHUFFLE_SEED).shuffle(items)
      n = num_shards or math.ceil(len(items) / EXAMPLES_PER_SHARD)
      n = max(1, min(n, len(items)))
      tasks += [_ShardTask(split, os.path.join(tmp, _shard_name(split, i, n)),
                           items[i::n], image_size) for i in range(n)]
    tasks.sort(key=lambda t: -len(t.items))   # Big shards first.
    total = sum(len(t.items) for t in tasks)
    log.info('preparing %d images from %s with %d worker(s) into %s', total,
             raw_dir, num_workers, final)
    shard_lengths = {t.path: 0 for t in tasks}
    counts = {s: dict.fromkeys(dataset.CLASS_NAMES, 0) for s in files}
    skipped = []
    for task, shard_counts, shard_skipped in _run_tasks(
        tasks, num_workers, total, show_progress):
      shard_lengths[task.path] = sum(shard_counts)
      for cls, n in zip(dataset.CLASS_NAMES, shard_counts):
        counts[task.split][cls] += n
      for path, reason in shard_skipped:
        log.warning('skipped %s: %s', path, reason)
      skipped += shard_skipped
    for split, by_class in counts.items():
      for cls, n in by_class.items():
        if not n:
          raise LayoutError(f'{raw_dir}: no readable {cls} image in the '
                            f'{split} split (all files skipped).')
    _write_metadata(tmp, image_size, {
        split: [shard_lengths[p] for p in sorted(shard_lengths)
                if os.path.basename(p).startswith(f'{dataset.NAME}-{split}.')]
        for split in files}, source=f'image folders in {raw_dir}')
    _commit(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  skipped.sort()
  return PrepareResult(final, image_size, counts, skipped, time.time() - start)


# ------------------------------------------------------- original TFRecords


def _count_records(path: str) -> int:
  """Counts TFRecord records by their length headers, without reading data."""
  count, size = 0, os.path.getsize(path)
  with open(path, 'rb') as f:
    pos = 0
    while pos < size:
      header = f.read(8)
      if len(header) < 8:
        raise LayoutError(f'{path}: truncated TFRecord file (at byte {pos}); '
                          'copy it again or remove it.')
      (length,) = struct.unpack('<Q', header)
      pos += 8 + 4 + length + 4
      if pos > size:
        raise LayoutError(f'{path}: truncated TFRecord file (record {count} '
                          f'needs {pos} bytes, file has {size}); copy it '
                          'again or remove it.')
      f.seek(pos)
      count += 1
  return count


def _first_record(path: str):
  """(image shape, label) of a shard's first record, parsed like TFDS does."""
  raw = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
  if raw is None:
    return None
  example = tf.io.parse_single_example(raw, {
      dataset.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
      dataset.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)})
  image = dataset.parse_image(example[dataset.IMAGE_KEY].numpy())
  return image.shape[:2], int(example[dataset.LABEL_KEY])


def find_tfrecord_files(tfrecord_dir: str) -> dict:
  """Returns {split: [(class, path)]} from original shard file names."""
  if not os.path.isdir(tfrecord_dir):
    raise LayoutError(f'{tfrecord_dir} is not a folder.')
  files = {}
  for name in sorted(os.listdir(tfrecord_dir)):
    path = os.path.join(tfrecord_dir, name)
    match = _SHARD_NAME.match(name)
    split = match and _match_alias(match['split'], SPLIT_ALIASES)
    cls = match and _match_alias(match['cls'], CLASS_ALIASES)
    if not (split and cls):
      if '.tfrecord' in name.lower():
        raise LayoutError(
            f'{path}: cannot tell split and class from the name; expected '
            '<split>_<class>.tfrecord[-NN-of-MM] with split train|valid|'
            'validation|val|test and class male|female.')
      log.warning('ignoring %s: not a TFRecord shard', path)
      continue
    key = (cls, int(match['index'] or 0), name)
    files.setdefault(split, []).append(key)
  missing = [s for s in REQUIRED_SPLITS if s not in files]
  if missing:
    raise LayoutError(
        f'{tfrecord_dir}: no {" or ".join(missing)} shards found. Expected '
        'files like train_male.tfrecord-01-of-20, valid_female.tfrecord-03-'
        'of-10 (split train|valid|test, class male|female).')
  return {split: [(cls, os.path.join(tfrecord_dir, name))
                  for cls, _, name in sorted(keys)]
          for split, keys in files.items()}


def wrap_tfrecords(tfrecord_dir: str, data_dir: str, copy: bool = False,
                   overwrite: bool = False) -> PrepareResult:
  """Makes original-format shards a TFDS dataset without re-encoding them.

  Each shard is symlinked (or copied, with `copy=True`) under its TFDS name;
  records are counted from their length headers, and each shard's first
  record is parsed to check the image shape and that its label matches the
  class in the file name.
  """
  start = time.time()
  final = dataset.dataset_dir(data_dir)
  _check_target(final, overwrite)
  files = find_tfrecord_files(tfrecord_dir)
  tmp = _make_tmp(final)
  try:
    image_size, shard_lengths = None, {}
    counts = {s: dict.fromkeys(dataset.CLASS_NAMES, 0) for s in files}
    for split, shards in files.items():
      shard_lengths[split] = []
      for i, (cls, path) in enumerate(shards):
        n = _count_records(path)
        first = _first_record(path)
        if first:
          size, label = first
          if image_size is None:
            image_size = tuple(size)
          if tuple(size) != image_size:
            raise LayoutError(
                f'{path}: images are {size[0]}x{size[1]}, other shards '
                f'{image_size[0]}x{image_size[1]}; one dataset has one image '
                'size: remove the odd shards.')
          if dataset.CLASS_NAMES[label] != cls:
            raise LayoutError(f'{path}: the name says {cls} but the first '
                              f'record has label {label} '
                              f'({dataset.CLASS_NAMES[label]}); rename it.')
        target = os.path.join(tmp, _shard_name(split, i, len(shards)))
        if copy:
          shutil.copyfile(path, target)
        else:
          os.symlink(os.path.abspath(path), target)
        shard_lengths[split].append(n)
        counts[split][cls] += n
    if image_size is None:
      raise LayoutError(f'{tfrecord_dir}: every shard is empty.')
    _write_metadata(tmp, image_size, shard_lengths,
                    source=f'original TFRecord shards in {tfrecord_dir}')
    _commit(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return PrepareResult(final, image_size, counts, [], time.time() - start)


# ------------------------------------------------------- metadata & commit


def _write_metadata(path: str, image_size, shard_lengths: dict,
                    source: str) -> None:
  """Writes dataset_info.json and features.json beside the shards."""
  split_infos = []
  for split, lengths in shard_lengths.items():
    num_bytes = sum(os.path.getsize(os.path.join(path, _shard_name(
        split, i, len(lengths)))) for i in range(len(lengths)))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=list(lengths), num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=path, features=dataset.features(image_size),
      split_infos=split_infos, version=dataset.VERSION, check_data=False,
      description=('Face crops labelled female (0) / male (1), in the '
                   f'original Keras project\'s TFRecord format; from {source}.'),
      supervised_keys=(dataset.IMAGE_KEY, dataset.LABEL_KEY))


def _remove_stale(final: str) -> None:
  """Cleans up after runs on this dataset whose process is gone (killed).

  Removes their `<final>.tmp-<pid>` folders; an `<final>.old-<pid>` (a run
  died inside `_commit`) is renamed back to `final` when that is missing,
  else removed. Folders of live processes are left alone.
  """
  parent, version = os.path.split(final)
  if not os.path.isdir(parent):
    return
  stale = re.compile(re.escape(version) + r'\.(tmp|old)-(\d+)')
  for name in sorted(os.listdir(parent)):
    match = stale.fullmatch(name)
    if not match or locking._pid_alive(int(match[2])):  # pylint: disable=protected-access
      continue
    path = os.path.join(parent, name)
    if match[1] == 'old' and not os.path.exists(final):
      log.warning('restoring %s from %s, left by process %s, which died '
                  'while replacing it', final, path, match[2])
      os.rename(path, final)
    else:
      log.warning('removing %s, left by process %s, which is no longer '
                  'running', path, match[2])
      shutil.rmtree(path)


def _check_target(final: str, overwrite: bool) -> None:
  _remove_stale(final)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(
        f'{final} already exists; pass --overwrite (overwrite=True) to '
        'replace it, or choose another --data_dir.')


def _make_tmp(final: str) -> str:
  """Creates this run's empty `<final>.tmp-<pid>` folder."""
  tmp = f'{final}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
  except OSError as e:
    data_dir = os.path.dirname(os.path.dirname(final))
    raise cli.UserError(
        f'cannot write the dataset into --data_dir {data_dir} ({e.strerror}: '
        f'{e.filename}); choose a folder you can write to.') from e
  return tmp


def _commit(tmp: str, final: str) -> None:
  """Renames `tmp` to `final`, replacing an existing `final` atomically."""
  if os.path.exists(final):
    old = f'{final}.old-{os.getpid()}'
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old)
  else:
    os.rename(tmp, final)
