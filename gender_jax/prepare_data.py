"""Builds the `gender_faces` TFDS dataset from labelled sources or original shards.

`prepare_sources` turns labelled sources (`gender_jax.sources`: folders,
UTKFace, CelebA, a CSV) into TFRecord shards in the original project's format
(`images` = `tf.io.serialize_tensor` of uint8 HxWx3 RGB, `label` int64, male
= 1) plus TFDS metadata, decoding with `image_io.decode` (as the labeller
does) in worker processes, one shard per task; unreadable files are skipped
with their reason. One source gives the splits train/validation/test; several
give `<part>_<source>` splits (`dataset.resolve_split` names their unions),
and the sources and their counts go into `metadata.json`. `wrap_tfrecords`
links (or copies) the original project's shards under TFDS names instead.

Either writes `<data_dir>/gender_faces/1.0.0/` atomically (a temporary folder
renamed into place; those of killed runs are removed by the next run), and
worker processes die with the run.
"""

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import io
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import threading
import time
from typing import Dict, Optional, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from gender_jax import dataset
from gender_jax import errors
from gender_jax import image_io
from gender_jax import labels
from gender_jax import locking
from gender_jax import sources as sources_lib
from gender_jax.sources import LayoutError  # pylint: disable=g-bad-import-order

SHUFFLE_SEED = 42
EXAMPLES_PER_SHARD = 1000
_SHARD_NAME = re.compile(
    r'^(?P<split>[a-z]+)[_.-](?P<cls>[a-z]+)\.tfrecords?'
    r'(?:-(?P<index>\d+)-of-(?P<total>\d+))?$', re.IGNORECASE)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrepareResult:
  """What a prepare run wrote.

  counts: split -> {'female': n, 'male': n} examples written (the dataset's
    own split names: `train`, ... or `train_<source>`, ...).
  skipped: (path, reason) of every input file that was not written.
  sources: source name -> {'kind', 'path', 'counts': {part: {class: n}}}.
  """
  output_dir: str
  image_size: tuple
  counts: dict
  skipped: list
  seconds: float
  sources: dict = dataclasses.field(default_factory=dict)

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
    if len(self.sources) > 1:
      for name, info in self.sources.items():
        parts = ', '.join(f'{part} {sum(c.values())}'
                          for part, c in info['counts'].items())
        lines.append(f"  source {name} ({info['kind']} {info['path']}): "
                     f'{parts}')
    lines.append(f'  skipped {len(self.skipped)} file(s)' +
                 ''.join(f'\n    {p}: {r}' for p, r in self.skipped))
    return '\n'.join(lines)


# ---------------------------------------------------------------- sources --


def _example(image_bytes: bytes, label: int) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      dataset.IMAGE_KEY: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      dataset.LABEL_KEY: tf.train.Feature(
          int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


@dataclasses.dataclass
class _Framing:
  """How every image is cut and resized (see `image_io.frame`)."""
  image_size: tuple
  resize: str = 'stretch'
  box_margin: float = 0.0


@dataclasses.dataclass
class _ShardTask:
  split: str
  path: str
  items: list          # [(image path, label, face box or None)]
  framing: _Framing


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _write_shard(task: _ShardTask):
  """Decodes, frames and writes one shard; returns (task, counts, skipped)."""
  counts = [0] * len(labels.CLASS_NAMES)
  skipped = []
  framing = task.framing
  with tf.io.TFRecordWriter(task.path) as writer:
    for path, label, box in task.items:
      image, reason = image_io.decode(path, framing.image_size, framing.resize,
                                      box, framing.box_margin)
      if image is None:
        skipped.append((path, reason))
      else:   # Write errors (disk full...) abort the run instead.
        writer.write(_example(dataset.serialize_image(image), label))
        counts[label] += 1
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


def _init_worker(parent_pid: int):
  _die_with_parent(parent_pid)
  tf.config.set_visible_devices([], 'GPU')
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _run_tasks(tasks, num_workers: int, total: int, show_progress: bool):
  """Yields `_write_shard` results as shards finish, in parallel processes
  when asked; the progress bar moves by a shard's images as it finishes."""
  bar = tqdm.tqdm(total=total, unit='img', disable=not show_progress,
                  desc='prepare', smoothing=0.1)
  with bar:
    if num_workers <= 1 or len(tasks) <= 1:
      results = map(_write_shard, tasks)
      pool = None
    else:
      # 'spawn': workers must not inherit the parent's running TF runtime.
      pool = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_init_worker, initargs=(os.getpid(),))
      results = (future.result() for future in concurrent.futures.as_completed(
          [pool.submit(_write_shard, t) for t in tasks]))
    try:
      for result in results:
        bar.update(len(result[0].items))
        yield result
    finally:
      if pool is not None:
        pool.shutdown(cancel_futures=True)


def _shard_name(split: str, index: int, total: int) -> str:
  return f'{dataset.NAME}-{split}.tfrecord-{index:05d}-of-{total:05d}'


def _source_root(source: sources_lib.Source) -> str:
  """The folder a source's paths (and face-box paths) are relative to."""
  return (os.path.dirname(os.path.abspath(source.path))
          if source.kind == 'csv' else os.path.abspath(source.path))


def _read_sources(specs: Sequence[str], val_fraction: float,
                  test_fraction: float) -> list:
  parsed = [sources_lib.parse_spec(s) for s in specs]
  if not parsed:
    raise LayoutError('no source: give --source=KIND:PATH (or --raw_dir).')
  names = sources_lib.source_names(parsed)
  return [sources_lib.read_source(kind, path, name, val_fraction,
                                  test_fraction)
          for name, (_, kind, path) in zip(names, parsed)]


def prepare_raw(raw_dir: str, data_dir: str, image_size=(218, 178),
                **kwargs) -> PrepareResult:
  """`prepare_sources` of one raw folder set (`folders` source)."""
  return prepare_sources([f'folders:{raw_dir}'], data_dir, image_size,
                         **kwargs)


def prepare_sources(specs: Sequence[str], data_dir: str,
                    image_size=(218, 178), *,
                    val_fraction: float = sources_lib.DEFAULT_VAL_FRACTION,
                    test_fraction: float = sources_lib.DEFAULT_TEST_FRACTION,
                    resize: str = 'stretch', boxes: Optional[str] = None,
                    box_margin: float = 0.0,
                    num_shards: Optional[int] = None,
                    num_workers: Optional[int] = None, overwrite: bool = False,
                    show_progress: bool = True) -> PrepareResult:
  """Converts labelled sources into the `gender_faces` TFDS dataset.

  Args:
    specs: '[NAME=]KIND:PATH' per source (`gender_jax.sources`).
    data_dir: TFDS data_dir; the dataset goes to data_dir/gender_faces/1.0.0.
    image_size: (height, width) every image is framed and resized to.
    val_fraction, test_fraction: the content-hash split of files that come
      without a split of their own (`sources.hash_split`).
    resize: 'stretch', 'crop' or 'pad' (`image_io.frame`).
    boxes: CSV of face boxes `path,x,y,w,h` (paths relative to each source's
      folder); an image with a box is cut to it, grown by `box_margin`.
    num_shards: shards per split (default: one per ~1000 images).
    num_workers: processes decoding and writing (default: CPU count).
    overwrite: replace an existing dataset (atomically) instead of refusing.
    show_progress: tqdm progress bar.
  """
  start = time.time()
  image_size = tuple(int(s) for s in image_size)
  if resize not in image_io.RESIZE_MODES:
    raise LayoutError(f'--resize={resize!r}: expected one of '
                      f'{"|".join(image_io.RESIZE_MODES)}.')
  if box_margin < 0:
    raise LayoutError(f'--box_margin={box_margin}: expected >= 0.')
  final = dataset.dataset_dir(data_dir)
  _check_target(final, overwrite)
  try:
    box_table = image_io.read_boxes(boxes) if boxes else None
  except (OSError, ValueError) as e:
    raise LayoutError(f'--boxes: {e}') from e
  sources = _read_sources(specs, val_fraction, test_fraction)
  framing = _Framing(image_size, resize, box_margin)
  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0))
  tmp = _make_tmp(final)
  try:
    tasks, skipped = [], []
    for source in sources:
      skipped += source.skipped
      root = _source_root(source)
      for part in labels.SPLITS:
        items = sorted(
            (item.path, item.label, image_io.find_box(
                box_table, os.path.relpath(item.path, root)))
            for item in source.items if item.split == part)
        if not items:
          continue
        split = part if len(sources) == 1 else f'{part}_{source.name}'
        random.Random(SHUFFLE_SEED).shuffle(items)
        n = num_shards or math.ceil(len(items) / EXAMPLES_PER_SHARD)
        n = max(1, min(n, len(items)))
        tasks += [_ShardTask(split, os.path.join(tmp, _shard_name(split, i, n)),
                             items[i::n], framing) for i in range(n)]
    tasks.sort(key=lambda t: -len(t.items))   # Big shards first.
    total = sum(len(t.items) for t in tasks)
    log.info('preparing %d images from %d source(s) with %d worker(s) into %s',
             total, len(sources), num_workers, final)
    splits = sorted({t.split for t in tasks},
                    key=lambda s: (labels.SPLITS.index(s.split('_')[0]), s))
    shard_lengths = {t.path: 0 for t in tasks}
    counts = {s: dict.fromkeys(labels.CLASS_NAMES, 0) for s in splits}
    for task, shard_counts, shard_skipped in _run_tasks(
        tasks, num_workers, total, show_progress):
      shard_lengths[task.path] = sum(shard_counts)
      for cls, n in zip(labels.CLASS_NAMES, shard_counts):
        counts[task.split][cls] += n
      for path, reason in shard_skipped:
        log.warning('skipped %s: %s', path, reason)
      skipped += shard_skipped
    for split, by_class in counts.items():
      for cls, n in by_class.items():
        if not n:
          raise LayoutError(f'{_split_origin(split, sources)}: no readable '
                            f'{cls} image in the {split} split (all files '
                            'skipped, or none given).')
    described = _describe_sources(sources, counts)
    _write_metadata(tmp, image_size, {
        split: [shard_lengths[p] for p in sorted(shard_lengths)
                if os.path.basename(p).startswith(f'{dataset.NAME}-{split}.')]
        for split in splits},
        source='; '.join(f"{name}: {info['kind']} {info['path']}"
                         for name, info in described.items()),
        extra={'sources': described, 'resize': resize,
               'box_margin': box_margin, 'boxes': boxes,
               'val_fraction': val_fraction, 'test_fraction': test_fraction})
    _commit(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  skipped.sort()
  return PrepareResult(final, image_size, counts, skipped, time.time() - start,
                       described)


def _split_origin(split: str, sources) -> str:
  if len(sources) == 1:
    return sources[0].path
  name = split.split('_', 1)[1]
  return next(s.path for s in sources if s.name == name)


def _describe_sources(sources, counts: Dict[str, dict]) -> dict:
  """{name: {'kind', 'path', 'counts': {part: {class: n}}}} as written."""
  out = {}
  for source in sources:
    parts = {}
    for part in labels.SPLITS:
      split = part if len(sources) == 1 else f'{part}_{source.name}'
      if split in counts:
        parts[part] = dict(counts[split])
    out[source.name] = {'kind': source.kind,
                        'path': os.path.abspath(source.path), 'counts': parts}
  return out


def verify(data_dir: str) -> str:
  """Reads every record of the dataset in `data_dir` and counts it against
  the metadata; returns a one-line summary, or raises `dataset.DataError`
  naming every damaged shard."""
  builder = dataset.load_builder(data_dir)
  problems = dataset.shard_problems(builder)
  if problems:
    raise dataset.DataError(
        f'{len(problems)} damaged shard(s) in {builder.data_dir}: '
        + '; '.join(problems) + '. Remake the dataset with '
        'scripts/prepare_data.py --overwrite.')
  splits = builder.info.splits
  return (f'{builder.data_dir}: every record of {len(splits)} split(s) '
          f'reads, {sum(len(s.filenames) for s in splits.values())} shards, '
          f'{sum(s.num_examples for s in splits.values())} examples as the '
          'metadata says.')


# ------------------------------------------------------- original TFRecords


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
    split = match and labels.match_alias(match['split'], labels.SPLIT_ALIASES)
    cls = match and labels.match_alias(match['cls'], labels.CLASS_ALIASES)
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
  missing = [s for s in sources_lib.REQUIRED_SPLITS if s not in files]
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
    image_size = None
    for split, shards in files.items():
      for i, (cls, path) in enumerate(shards):
        image_size = _check_first_record(path, cls, image_size)
        target = os.path.join(tmp, _shard_name(split, i, len(shards)))
        if copy:
          shutil.copyfile(path, target)
        else:
          os.symlink(os.path.abspath(path), target)
    if image_size is None:
      raise LayoutError(f'{tfrecord_dir}: every shard is empty.')
    split_infos = _compute_split_infos(tmp, files)
    counts = {s: dict.fromkeys(labels.CLASS_NAMES, 0) for s in files}
    for info in split_infos:
      for (cls, _), n in zip(files[info.name], info.shard_lengths):
        counts[info.name][cls] += n
    _write_metadata(tmp, image_size, split_infos,
                    source=f'original TFRecord shards in {tfrecord_dir}')
    _commit(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return PrepareResult(final, image_size, counts, [], time.time() - start)


def _check_first_record(path: str, cls: str, image_size):
  """The shards' image size, checked against `path`'s first record (which
  must also have the label `cls`, the class in its name); None while every
  shard so far is empty."""
  first = _first_record(path)
  if not first:
    return image_size
  size, label = first
  if image_size is not None and tuple(size) != tuple(image_size):
    raise LayoutError(
        f'{path}: images are {size[0]}x{size[1]}, other shards '
        f'{image_size[0]}x{image_size[1]}; one dataset has one image '
        'size: remove the odd shards.')
  if labels.CLASS_NAMES[label] != cls:
    raise LayoutError(f'{path}: the name says {cls} but the first '
                      f'record has label {label} '
                      f'({labels.CLASS_NAMES[label]}); rename it.')
  return tuple(size)


def _compute_split_infos(tmp: str, files: dict) -> list:
  """TFDS's split infos (records and bytes per shard) of the shards linked
  into `tmp` (`tfds.folder_dataset.compute_split_info` reads every record);
  a LayoutError names each original shard that cannot be read."""
  template = tfds.core.ShardedFileTemplate(
      data_dir=tfds.core.Path(tmp), dataset_name=dataset.NAME,
      template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      filetype_suffix='tfrecord')
  try:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      infos = tfds.folder_dataset.compute_split_info(
          filename_template=template)
  except tf.errors.OpError as e:
    damaged = [f'{path}: {problem}' for shards in files.values()
               for _, path in shards
               for problem in [dataset.read_records(path)[1]] if problem]
    raise LayoutError('damaged TFRecord shard(s): ' + '; '.join(
        damaged or [dataset.first_line(e)]) + '; copy them again or remove '
                      'them.') from e
  log.info('%s', printed.getvalue().strip())
  return list(infos)


# ------------------------------------------------------- metadata & commit


def _write_metadata(path: str, image_size, split_infos, source: str,
                    extra: Optional[dict] = None) -> None:
  """Writes dataset_info.json, features.json and (with `extra`, e.g. the
  sources and their counts) metadata.json beside the shards.
  `split_infos`: `tfds.core.SplitInfo`s, or {split: [records per shard]}
  (bytes are read from the shards)."""
  if isinstance(split_infos, dict):
    split_infos = [tfds.core.SplitInfo(
        name=split, shard_lengths=list(lengths),
        num_bytes=sum(os.path.getsize(os.path.join(path, _shard_name(
            split, i, len(lengths)))) for i in range(len(lengths))))
                   for split, lengths in split_infos.items()]
  tfds.folder_dataset.write_metadata(
      data_dir=path, features=dataset.features(image_size),
      split_infos=split_infos, version=dataset.VERSION, check_data=False,
      description=('Face crops labelled female (0) / male (1), in the '
                   f'original Keras project\'s TFRecord format; from {source}.'),
      supervised_keys=(dataset.IMAGE_KEY, dataset.LABEL_KEY),
      metadata=tfds.core.MetadataDict(extra) if extra else None)


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
    raise errors.UserError(
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
