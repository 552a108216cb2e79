"""The labeller on Ray Data: the same CSV as `gender_jax.label`, on a cluster.

`run` runs the local engine's checks and resume rules, then streams the
images still to do through Ray Data:

  sorted file list -> blocks of whole batches -> decode + framing in CPU
  tasks (`image_io.load_images`, the local engine's decode) -> the model in an
  actor pool (each actor loads the workdir once; one GPU each when the
  cluster has GPUs) -> the driver

and the driver writes what arrives as shard CSVs, `<output>.ray/part-*.csv`
(each written whole, sorted by the file list), and at the end merges every
shard into the CSV in file-list order, with the local engine's row format.
Each image's MC-Dropout key derives from the seed and its path, so the rows
are byte for byte the local engine's. A killed driver leaves finished shards:
the next run labels only the images in neither the CSV nor a shard, then
merges all of them. Ray retries a killed decode task or model actor itself
(Ray Data's defaults: max_retries, max_restarts and max_task_retries -1).

With no address, an embedded Ray is started on this machine (and stopped at
the end); `ray_address='auto'` or 'ray://host:10001' joins a cluster, whose
nodes must see `workdir` and `images_dir` at the same paths. Ray is imported
only here, when the engine runs (`pip install '.[ray]'`).
"""
import contextlib
import csv
import glob
import heapq
import logging as std_logging
import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
from absl import logging

from gender_jax import fileio
from gender_jax import image_io
from gender_jax import label
from gender_jax import label_csv
from gender_jax import label_report
from gender_jax import predict

# Memory reserved by a decode task (a batch of full-size photos in PIL). Being
# resources the model actors do not ask for, it also keeps Ray Data from
# fusing decoding into the actors, so decoding runs in its own CPU tasks.
DECODE_MEMORY = 256 * 2**20
# A shard is written once this many rows or seconds have arrived (a killed
# driver loses at most that much work).
SHARD_ROWS = 20000
SHARD_SECONDS = 10.0
# Shards merged at once (open files); more are first merged in groups.
MERGE_FAN_IN = 256
_SHARD_GLOB = 'part-*.csv'


def _text(value: bytes) -> str:
  """A str of bytes carried through Ray (file names that are not UTF-8
  round-trip as surrogate escapes, as `label_report.open_csv` writes them)."""
  return bytes(value).decode('utf-8', 'surrogateescape')


def _raw(text: str) -> bytes:
  return text.encode('utf-8', 'surrogateescape')


# ------------------------------------------------------------------ shards --


def shard_files(shard_dir: str) -> List[str]:
  """The finished shards in `shard_dir` (none if it does not exist)."""
  return sorted(glob.glob(os.path.join(glob.escape(shard_dir), _SHARD_GLOB)))


def pending_shards(outputs: Dict[str, str]) -> List[str]:
  """The finished shards of an interrupted Ray run on `outputs['csv']`.

  Shards beside a missing or empty CSV were left by a run whose CSV the user
  deleted to start over: they are removed, and none are returned.
  """
  shards = shard_files(outputs['shards'])
  csv_path = outputs['csv']
  if shards and not (os.path.exists(csv_path) and os.path.getsize(csv_path)):
    shutil.rmtree(outputs['shards'])
    logging.warning('Removed %s: shards of an earlier run whose CSV is gone.',
                    label_report.display_path(outputs['shards']))
    return []
  return shards


def _next_number(shard_dir: str) -> int:
  """The number of the next shard in `shard_dir` (after the last one)."""
  shards = shard_files(shard_dir)
  if not shards:
    return 0
  return int(os.path.basename(shards[-1])[len('part-'):-len('.csv')]) + 1


def _write_shard(shard_dir: str, number: int, header, rows) -> None:
  """Writes `rows` ((sort key, CSV bytes) pairs) whole, sorted by key."""
  os.makedirs(shard_dir, exist_ok=True)
  rows.sort(key=lambda row: row[0])
  fileio.write_atomic(os.path.join(shard_dir, f'part-{number:06d}.csv'),
                      label_csv.csv_bytes([header])
                      + b''.join(r for _, r in rows))


def _keyed_rows(shard: str, header, order: Dict[str, int]) -> Iterator:
  """((file-list position, path), row) of each row of `shard`, in order."""
  for row in label_csv.data_rows(shard, header):
    yield (order.get(row[0], len(order)), row[0]), row


def _merged(shards: Sequence[str], header, order) -> Iterator[list]:
  """The rows of the sorted `shards` in file-list order, each path once."""
  last = None
  for key, row in heapq.merge(*(_keyed_rows(s, header, order)
                                for s in shards), key=lambda kr: kr[0]):
    if key != last:
      last = key
      yield row


def _compact(shard_dir: str, header, order) -> List[str]:
  """Merges shards in groups until at most `MERGE_FAN_IN` are left."""
  shards = shard_files(shard_dir)
  while len(shards) > MERGE_FAN_IN:
    group = shards[:MERGE_FAN_IN]
    rows = [(i, label_csv.csv_bytes([row])) for i, row in
            enumerate(_merged(group, header, order))]
    _write_shard(shard_dir, _next_number(shard_dir), header, rows)
    for shard in group:
      os.remove(shard)
    shards = shard_files(shard_dir)
  return shards


def merge_shards(outputs: Dict[str, str], header, files: Sequence[str],
                 done: Set[str]) -> int:
  """Appends the shards' rows whose path is not in `done` (the CSV's) to the
  CSV, in the order of `files`, then removes the shards; returns how many.

  A kill leaves the shards: the next merge skips the rows the CSV got.
  """
  order = {path: i for i, path in enumerate(files)}
  count = 0
  with label_report.open_csv(outputs['csv'], 'a') as f:
    writer = csv.writer(f)
    for row in _merged(_compact(outputs['shards'], header, order), header,
                       order):
      if row[0] not in done:
        writer.writerow(row)
        count += 1
    f.flush()
    os.fsync(f.fileno())
  shutil.rmtree(outputs['shards'], ignore_errors=True)
  return count


# ---------------------------------------------------------- Ray functions --


def _describe(workdir: str, options: dict) -> dict:
  """What the driver needs of the model: its `settings()`, batch_size and
  image_size (`_model_info` says where it runs)."""
  predictor = label.load_predictor(workdir, **options)
  return {'settings': predictor.settings(),
          'batch_size': predictor.batch_size,
          'image_size': predictor.image_size}


def decode_batch(batch: dict, images_dir: str, image_size, resize: str,
                 box_margin: float, num_threads: int) -> dict:
  """Decodes and frames a batch of paths as the local engine does."""
  paths = [os.path.join(images_dir, _text(p)) for p in batch['path']]
  boxes = None
  if 'box' in batch:
    boxes = [None if np.isnan(b).any() else tuple(float(v) for v in b)
             for b in batch['box']]
  images, errors = image_io.load_images(paths, image_size, num_threads,
                                        resize, boxes, box_margin)
  return {'index': batch['index'], 'path': batch['path'], 'image': images,
          'error': [_raw(errors.get(i, '')) for i in range(len(paths))]}


class ModelActor:
  """Loads the workdir's model once; turns decoded batches into CSV rows."""

  def __init__(self, workdir: str, options: dict, step):
    self.predictor = predict.Predictor.from_workdir(workdir, **options)
    if self.predictor.checkpoint_step != step:
      raise label.LabelError(
          f'the best checkpoint of {workdir} changed during labelling (step '
          f'{step}, now {self.predictor.checkpoint_step}): rerun.')
    self.header = label_csv.columns(self.predictor.mc_samples)
    self.predictor.warm_up()

  def __call__(self, batch: dict) -> dict:
    paths = [_text(p) for p in batch['path']]
    errors = [_text(e) for e in batch['error']]
    out = self.predictor.predict(batch['image'], predict.path_ids(paths))
    rows = label_csv.format_rows(paths, errors, out, self.header)
    return {'index': batch['index'],
            'row': [label_csv.csv_bytes([r]) for r in rows],
            'failed': np.asarray([bool(e) for e in errors])}


# ---------------------------------------------------------------- driving --


def _import_ray():
  try:
    import ray  # pylint: disable=g-import-not-at-top
    import ray.data  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise label.LabelError(
        f"--engine=ray needs Ray Data ({e}): pip install '.[ray]'.") from e
  return ray


def _connect(ray, address: Optional[str]) -> bool:
  """Joins `address` (else RAY_ADDRESS, as Ray does: `ray job submit` sets
  it), or starts an embedded Ray; True if this call started the connection
  (and so must shut it down). A session already open (a notebook's, a
  test's) is used as it is."""
  if ray.is_initialized():
    return False
  address = address or os.environ.get('RAY_ADDRESS')
  try:
    if address:
      ray.init(address=address)
    else:
      # A new instance ('local': not one `ray start` left running here), quiet:
      # the user asked for a labeller, not for a Ray instance's news.
      ray.init(address='local', num_cpus=os.cpu_count(),
               include_dashboard=False, logging_level=std_logging.ERROR)
  except (ConnectionError, ValueError) as e:
    raise label.LabelError(f'--ray_address={address}: {e}') from e
  return True


@contextlib.contextmanager
def _session(address: Optional[str]):
  """Ray, connected (`_connect`), with Ray Data's progress bars off (the
  labeller shows its own); the connection is closed after if opened here."""
  ray = _import_ray()
  started = _connect(ray, address)
  context = ray.data.DataContext.get_current()
  bars, context.enable_progress_bars = context.enable_progress_bars, False
  try:
    yield ray
  finally:
    context.enable_progress_bars = bars
    if started:
      ray.shutdown()


def _model_info(ray, workdir: str, options: dict):
  """`_describe`, here on a cluster without accelerators (JAX in this
  process then takes none from an actor, and no worker has to start JAX for
  it), else in a CPU-only Ray task, its LabelError re-raised here."""
  resources = ray.cluster_resources()
  if not (resources.get('GPU') or resources.get('TPU')):
    return _describe(workdir, options)
  task = ray.remote(_describe).options(
      num_cpus=1, num_gpus=0, max_retries=0,
      runtime_env={'env_vars': {'JAX_PLATFORMS': 'cpu'}})
  try:
    return ray.get(task.remote(workdir, options))
  except ray.exceptions.RayTaskError as e:
    if isinstance(e.cause, label.LabelError):
      raise e.cause from None
    raise


def _actor_resources(ray, num_actors: Optional[int]):
  """(actors, resources of one actor): default one per GPU, else one per
  node (Ray Data spreads actors over nodes); LabelError if they would leave
  no CPU for decoding."""
  resources = ray.cluster_resources()
  gpus, cpus = int(resources.get('GPU', 0)), int(resources.get('CPU', 0))
  nodes = sum(1 for n in ray.nodes() if n.get('Alive'))
  actors = num_actors or gpus or max(1, nodes)
  if actors >= cpus:
    raise label.LabelError(
        f'--num_actors={actors}: the Ray cluster has {cpus} CPU(s); each model '
        'actor takes one and decoding needs at least one more.')
  return actors, dict(num_cpus=1, num_gpus=1 if gpus else None)


def _blocks(todo, order, framing, batch_size: int, actors: int):
  """Arrow tables of the paths to do, each one Ray block: whole batches
  (but the last), so that no batch but the last one is padded."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  batches = -(-len(todo) // batch_size)
  rows = batch_size * max(1, min(8, batches // (4 * actors + 16)))
  for start in range(0, len(todo), rows):
    paths = todo[start:start + rows]
    columns = {'index': pa.array([order[p] for p in paths], pa.int64()),
               'path': pa.array([_raw(p) for p in paths], pa.binary())}
    if framing.table:
      columns['box'] = pa.array(
          [box or [np.nan] * 4 for box in framing.boxes_of(paths)],
          pa.list_(pa.float64(), 4))
    yield pa.table(columns)


def _dataset(ray, todo, order, images_dir, info, framing, workdir, actors,
             actor_args, num_threads):
  """The Ray Data pipeline: paths -> decoded batches -> CSV rows."""
  options = dict(info['settings'], batch_size=info['batch_size'])
  step = options.pop('checkpoint_step')
  blocks = list(_blocks(todo, order, framing, info['batch_size'], actors))
  return ray.data.from_arrow(blocks).map_batches(
      decode_batch, batch_size=info['batch_size'], batch_format='numpy',
      num_cpus=1, memory=DECODE_MEMORY,
      fn_kwargs=dict(images_dir=images_dir, image_size=info['image_size'],
                     resize=framing.resize, box_margin=framing.box_margin,
                     num_threads=num_threads),
  ).map_batches(
      ModelActor, batch_size=info['batch_size'], batch_format='numpy',
      compute=ray.data.ActorPoolStrategy(size=actors),
      fn_constructor_kwargs=dict(workdir=workdir, options=options, step=step),
      **actor_args)


def _stream_to_shards(dataset, shard_dir: str, header, bar) -> tuple:
  """Writes the dataset's rows as shards as they arrive; returns (errors,
  seconds until the first rows came)."""
  number, rows, num_errors, first = _next_number(shard_dir), [], 0, None
  start = last = time.perf_counter()
  # Closed on any exit, so that an interrupted run stops its tasks and actors.
  with contextlib.closing(iter(dataset.iter_batches(
      batch_size=None, batch_format='numpy'))) as batches:
    for batch in batches:
      first = first or time.perf_counter() - start
      rows.extend(zip(batch['index'].tolist(), batch['row']))
      num_errors += int(batch['failed'].sum())
      bar.update(len(batch['index']))
      if (len(rows) >= SHARD_ROWS or
          time.perf_counter() - last >= SHARD_SECONDS):
        _write_shard(shard_dir, number, header, rows)
        number, rows, last = number + 1, [], time.perf_counter()
  if rows:
    _write_shard(shard_dir, number, header, rows)
  return num_errors, first or 0.0


def run(config, workdir: str, images_dir: str, outputs: Dict[str, str],
        framing_and_line, progress: bool, options: dict,
        ray_address: Optional[str] = None, num_actors: Optional[int] = None,
        num_workers: Optional[int] = None) -> dict:
  """Labels the images not yet in the CSV (nor in shards) on Ray; merges.

  `framing_and_line`: `framing.resolve_framing`'s (Framing, line); the line
  is shown once the model is found. `options`: the Predictor's
  mc_samples, batch_size, seed, runtime and tta.
  `num_workers`: decoding threads per decode task (default 1: Ray runs
  one task per CPU). Returns the local engine's counts and timings, plus
  `num_actors` and `startup_seconds` (until the first rows arrived: actor
  start, model load and compilation).
  """
  framing, framing_line = framing_and_line
  with _session(ray_address) as ray:
    actors, actor_args = _actor_resources(ray, num_actors)
    shards = pending_shards(outputs)
    info = _model_info(ray, workdir, options)
    label.announce(framing_line, progress)
    header, files, done, num_dropped = label.prepare(
        config, workdir, images_dir, outputs, info['settings'], framing)
    output_csv = outputs['csv']
    if not os.path.exists(output_csv) or not os.path.getsize(output_csv):
      fileio.write_atomic(output_csv, label_csv.csv_bytes([header]))
    sharded = {row[0] for s in shards
               for row in label_csv.data_rows(s, header)}
    todo = label.images_to_do(files, done | sharded, images_dir, progress)
    start = time.perf_counter()
    num_errors, startup = 0, 0.0
    if todo:
      dataset = _dataset(ray, todo, {p: i for i, p in enumerate(files)},
                         images_dir, info, framing, workdir, actors,
                         actor_args, num_workers or 1)
      with label.progress_bar(files, todo, progress) as bar:
        num_errors, startup = _stream_to_shards(dataset, outputs['shards'],
                                                header, bar)
    merge_shards(outputs, header, files, done)
    seconds = time.perf_counter() - start
  summary = label.run_summary(
      output_csv, files, todo, num_dropped, num_errors, info['settings'],
      info['batch_size'], framing, None, seconds, 'ray')
  summary.update(num_actors=actors, startup_seconds=startup)
  return summary
