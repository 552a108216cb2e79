"""Label a folder of face images with a trained model, resumably, into CSV.

`label_images` walks a folder recursively, decodes images in a thread pool
ahead of the devices, runs one jitted program per fixed-size batch (the last
batch padded) and appends one CSV row per image, in a deterministic order,
flushing after each batch:

  path, p_male, predicted[, mc_mean, mc_std, mc_entropy, mc_mutual_info], error

`path` is relative to the images folder (file names that are not valid UTF-8
are kept byte for byte, see `label_report.open_csv`); an unreadable file gets
a row with empty numbers and its `error` reason. The labeller's own outputs
are never inputs, wherever they are.

One run at a time per output: `<output>.lock` names the run holding it.
Arguments that change the numbers are stored next to the CSV
(`<output>.args.json`); a second run with the same arguments skips the images
already in the CSV (a half-written last line of a killed run is dropped and
redone), so a killed run continues without duplicate or missing rows.
Different arguments are refused. A CSV with duplicate rows (e.g. from two
runs of an older version at once) is repaired on resume, keeping each path's
first row. The summaries are then written by `label_report.summarize`.

Framing is the training data's: `resize` (stretch|crop|pad) and, with a
face-box CSV, `box_margin` default to what `scripts/prepare_data.py` recorded
in the training dataset's metadata.json (else 'stretch', as the original),
and each image with a box (looked up by its path relative to the images
folder) is cut to it first, by the same `image_io.decode`.

`engine='ray'` labels on Ray Data instead (`gender_jax.label_ray`: an
embedded Ray, or a cluster), with the same checks, resume rules and rows.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import json
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import jax
import numpy as np
import tqdm
from absl import logging

from gender_jax import errors
from gender_jax import fileio
from gender_jax import image_io
from gender_jax import label_report
from gender_jax import locking
from gender_jax import predict
from gender_jax import labels as labels_lib

BASE_COLUMNS = ('path', 'p_male', 'predicted')
ENGINES = ('local', 'ray')
ERROR_COLUMN = 'error'
# Where prepare_data.py writes a dataset's metadata (`dataset.dataset_dir`),
# read here without importing TensorFlow.
_DATASET_METADATA = os.path.join('gender_faces', '1.0.0', 'metadata.json')


class LabelError(errors.UserError, ValueError):
  """A labelling input the user must fix; the message says which and how."""


def columns(mc_samples: int) -> tuple:
  """The CSV header for `mc_samples`."""
  mc = predict.MC_KEYS if mc_samples > 1 else ()
  return BASE_COLUMNS + mc + (ERROR_COLUMN,)


def output_paths(output_csv: str) -> Dict[str, str]:
  """Every file the labeller writes for `output_csv` (the CSV included)."""
  return {
      'csv': output_csv,
      'args': output_csv + '.args.json',
      'lock': output_csv + '.lock',
      'repair': output_csv + '.repair.tmp',
      'shards': output_csv + '.ray',     # The Ray engine's shards (a folder).
      **label_report.report_paths(output_csv),
  }


def own_outputs(images_dir: str, outputs: Dict[str, str]) -> Set[str]:
  """The labeller's output files as paths relative to `images_dir` (those
  inside it), so that they are never labelled as images."""
  root = os.path.realpath(images_dir)
  inside = set()
  for path in outputs.values():
    rel = os.path.relpath(os.path.realpath(path), root)
    if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
      inside.add(rel.replace(os.sep, '/'))
  return inside


# ---------------------------------------------------------------- checking --


def _read_config(workdir: str):
  """The workdir's training config; a missing workdir is a LabelError."""
  from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    return checkpointing.read_config(workdir)
  except FileNotFoundError as e:
    raise LabelError(e) from e


def _load_predictor(workdir, mc_samples, batch_size, seed, runtime, tta):
  """The workdir's best model (calibrated) as a Predictor; a missing
  checkpoint or a bad mc_samples/batch_size/runtime/tta is a LabelError."""
  try:
    return predict.Predictor.from_workdir(
        workdir, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
        runtime=runtime, tta=tta)
  except (FileNotFoundError, ValueError) as e:
    raise LabelError(e) from e


def _check_inputs(images_dir: str, labels: Optional[str],
                  output_csv: str) -> None:
  """Fails early (before labelling) on a missing folder, a bad labels file or
  an --output that is a directory."""
  if os.path.isdir(output_csv):
    raise LabelError(f'--output {output_csv!r} is a directory: give the path '
                     'of the CSV file to write, e.g. labels.csv.')
  if not os.path.isdir(images_dir):
    raise LabelError(f'--images {images_dir!r} is not a directory: pass the '
                     'folder holding the images.')
  if labels not in (None, label_report.FOLDER_LABELS):
    try:
      label_report.read_labels(labels, images_dir)
    except (OSError, ValueError) as e:
      raise LabelError(f'--labels: {e}') from e


@dataclasses.dataclass(frozen=True)
class Framing:
  """How each image meets the model's input (`image_io.frame`)."""
  resize: str = 'stretch'
  box_margin: float = 0.0
  boxes: Optional[str] = None      # The face-box CSV ...
  table: Optional[dict] = None     # ... and its boxes (`image_io.read_boxes`).

  def box(self, rel_path: str):
    """The face box of the image at `rel_path` (under the images folder)."""
    return image_io.find_box(self.table, rel_path)


def _dataset_framing(data_dir: str) -> Tuple[dict, str]:
  """(resize and box_margin recorded in the training dataset's metadata,
  the metadata's path); ({}, path) when there is none to read."""
  path = os.path.join(data_dir, _DATASET_METADATA)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return {}, path
  return {k: meta[k] for k in ('resize', 'box_margin') if k in meta}, path


def resolve_framing(config, resize: Optional[str] = None,
                    boxes: Optional[str] = None,
                    box_margin: Optional[float] = None
                    ) -> Tuple[Framing, str]:
  """The run's `Framing` and one line saying where it comes from.

  `resize` and `box_margin` left None are the training dataset's (its
  metadata.json under `config.data_dir`), else 'stretch' and 0. LabelError
  for an unknown mode, a negative margin or an unreadable box file.
  """
  recorded, meta_path = _dataset_framing(config.get('data_dir') or '')
  values, origins = {}, {}
  for key, given, default in (('resize', resize, 'stretch'),
                              ('box_margin', box_margin, 0.0)):
    if given is not None:
      values[key], origins[key] = given, 'given'
    elif key in recorded:
      values[key], origins[key] = recorded[key], f'training data {meta_path}'
    else:
      values[key], origins[key] = default, 'default'
  if values['resize'] not in image_io.RESIZE_MODES:
    raise LabelError(f'--resize={values["resize"]!r}: expected one of '
                     f'{"|".join(image_io.RESIZE_MODES)}.')
  if values['box_margin'] < 0:
    raise LabelError(f'--box_margin={values["box_margin"]}: expected >= 0.')
  line = f'Framing: resize={values["resize"]} ({origins["resize"]})'
  if not boxes:
    return Framing(values['resize']), line + ', no face boxes.'
  try:
    table = image_io.read_boxes(boxes)
  except (OSError, ValueError) as e:
    raise LabelError(f'--boxes: {e}') from e
  line += (f', {len(table)} face boxes from {boxes}, box_margin='
           f'{values["box_margin"]} ({origins["box_margin"]}).')
  return Framing(values['resize'], float(values['box_margin']),
                 os.path.abspath(boxes), table), line


def _run_arguments(workdir, images_dir, config, predictor, header,
                   framing: Framing) -> dict:
  """The arguments that change the CSV's numbers (stored in the sidecar)."""
  args = {
      'workdir': os.path.abspath(workdir),
      'images_dir': os.path.abspath(images_dir),
      'mc_samples': predictor.mc_samples,
      'seed': predictor.seed,
      'model': config.model,
      'image_size': list(config.image_size),
      'columns': list(header),
      'checkpoint_step': predictor.meta.get('step'),
  }
  # Only when not the default, so that older sidecars still match.
  if predictor.runtime != 'jax':
    args['runtime'] = predictor.runtime
  if framing.resize != 'stretch':
    args['resize'] = framing.resize
  if framing.boxes:
    args['boxes'] = framing.boxes
    args['box_margin'] = framing.box_margin
  if predictor.temperature != 1.0:
    args['temperature'] = predictor.temperature
  if predictor.tta != 'none':
    args['tta'] = predictor.tta
  return args


def _check_args(args_path: str, args: dict, output_csv: str) -> None:
  """Writes the arguments sidecar, or checks an existing one matches."""
  csv_exists = os.path.exists(output_csv) and os.path.getsize(output_csv) > 0
  if not csv_exists:
    fileio.write_json(args_path, args, sort_keys=True)
    return
  if not os.path.exists(args_path):
    raise LabelError(
        f'{output_csv} exists but {args_path} (the arguments it was made with) '
        'does not, so it cannot be resumed safely. Delete it or choose another '
        '--output.')
  try:
    with open(args_path) as f:
      old = json.load(f)
  except ValueError as e:
    raise LabelError(
        f'{args_path} is not readable JSON ({e}); it records the arguments '
        'of the labels CSV beside it. Delete both or choose another '
        '--output.') from e
  diff = {k: (old.get(k), args.get(k)) for k in set(old) | set(args)
          if old.get(k) != args.get(k)}
  if diff:
    lines = '\n'.join(f'  {k}: was {a!r}, now {b!r}'
                      for k, (a, b) in sorted(diff.items()))
    raise LabelError(
        f'{output_csv} was made with other arguments; resuming would mix '
        f'results:\n{lines}\nRerun with the old arguments, or delete '
        f'{output_csv} and {args_path}, or choose another --output.')


# ---------------------------------------------------------------- resuming --


def _drop_partial_last_record(path: str, num_columns: int) -> None:
  """Truncates a killed run's half-written last record.

  The CSV is parsed with the csv module, streaming, so a record whose quoted
  file name holds a newline counts as one record: the file is cut after the
  last record that ends with a line break and has `num_columns` fields (a
  record cut anywhere, even inside a quoted field, is dropped and relabelled).
  """
  state = {'offset': 0, 'newline': False}
  end = 0
  with open(path, 'rb') as f:
    def lines():
      for line in f:
        state['offset'] += len(line)
        state['newline'] = line.endswith(b'\n')
        yield line.decode('utf-8', 'surrogateescape')
    try:
      for row in csv.reader(lines()):
        if state['newline'] and len(row) == num_columns:
          end = state['offset']
    except csv.Error:       # A quoted field cut by the end of the file.
      pass
    size = f.seek(0, os.SEEK_END)
  if end < size:
    with open(path, 'rb+') as f:
      f.truncate(end)


def _data_rows(output_csv: str, header: Sequence[str]) -> Iterator[list]:
  """The rows after the header of `output_csv` (checked to be `header`)."""
  with label_report.open_csv(output_csv) as f:
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
      return
    if tuple(first) != tuple(header):
      raise LabelError(
          f'{output_csv} has columns {first}, expected {list(header)}. Delete '
          'it or choose another --output.')
    yield from (row for row in reader if row)


def _unwanted(row: list, seen: Set[str], header: Sequence[str],
              excluded: Set[str]) -> Optional[str]:
  """Why a resumed row must go ('duplicate' ...), or None to keep it."""
  if tuple(row) == tuple(header):
    return 'repeated header'
  if row[0] in seen:
    return 'duplicate'
  if row[0] in excluded:
    return "the labeller's own output"
  return None


def _rewrite_without(output_csv: str, header: Sequence[str],
                     excluded: Set[str], tmp: str) -> None:
  """Rewrites `output_csv` without its unwanted rows, atomically (a full
  copy in `tmp`, then os.replace): a kill leaves the old or the new CSV."""
  seen = set()
  with label_report.open_csv(tmp, 'w') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in _data_rows(output_csv, header):
      if _unwanted(row, seen, header, excluded) is None:
        seen.add(row[0])
        writer.writerow(row)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, output_csv)


def _done_paths(output_csv: str, header: Sequence[str], excluded: Set[str],
                tmp: str) -> Tuple[Set[str], int]:
  """(paths already labelled in `output_csv`, rows dropped to repair it).

  Repairs: a killed run's partial last row is dropped; repeated rows of a
  path (two runs at once of an older version), repeated headers and rows of
  `excluded` paths (the labeller's own outputs) are removed, keeping each
  path's first row, and how many is logged.
  """
  if not os.path.exists(output_csv):
    return set(), 0
  _drop_partial_last_record(output_csv, len(header))
  seen, dropped = set(), collections.Counter()
  for row in _data_rows(output_csv, header):
    reason = _unwanted(row, seen, header, excluded)
    if reason is None:
      seen.add(row[0])
    else:
      dropped[reason] += 1
  if dropped:
    _rewrite_without(output_csv, header, excluded, tmp)
    logging.warning('Repaired %s: dropped %s; kept the first row of each '
                    'image.', label_report.display_path(output_csv),
                    ', '.join(f'{n} row(s): {why}'
                              for why, n in sorted(dropped.items())))
  return seen, sum(dropped.values())


# ---------------------------------------------------------------- decoding --


def decoded_batches(paths: Sequence[str], image_size, batch_size: int,
                    num_workers: int, prefetch: int = 2, *,
                    resize: str = 'stretch',
                    boxes: Optional[Sequence] = None, box_margin: float = 0.0):
  """Yields (start, images, errors) per batch of `paths`, decoded ahead.

  `images` is always (batch_size, H, W, 3) uint8 (unreadable files and the
  padding of the last batch are zeros); `errors` lists one reason per path
  of the batch ('' when it decoded). Up to `prefetch` batches beyond the one
  yielded are being decoded by `num_workers` threads meanwhile. `resize`,
  `boxes` (a face box or None per path) and `box_margin`: `image_io.decode`.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = collections.deque()
    starts = iter(range(0, len(paths), batch_size))

    def submit():
      start = next(starts, None)
      if start is not None:
        pending.append((start, [
            pool.submit(image_io.decode, paths[i], image_size, resize,
                        boxes[i] if boxes is not None else None, box_margin)
            for i in range(start, min(start + batch_size, len(paths)))]))

    for _ in range(prefetch + 1):
      submit()
    while pending:
      start, futures = pending.popleft()
      submit()
      images = np.zeros((batch_size, *image_size, 3), np.uint8)
      errors = []
      for i, future in enumerate(futures):
        image, error = future.result()
        if image is not None:
          images[i] = image
        errors.append(error)
      yield start, images, errors


# ---------------------------------------------------------------- labelling --


def _format_rows(paths, errors, outputs, keys, names) -> List[list]:
  """CSV rows of one batch; `keys` are p_male and the MC statistics,
  `names` the class names."""
  rows = []
  for i, (path, error) in enumerate(zip(paths, errors)):
    if error:
      rows.append([path] + [''] * (len(keys) + 1) + [error])
      continue
    p = float(outputs['p_male'][i])
    row = [path, f'{p:.7g}', names[int(p >= 0.5)]]
    row += [f'{float(outputs[k][i]):.7g}' for k in keys[1:]]
    rows.append(row + [''])
  return rows


def _warm_up(predictor: predict.Predictor) -> float:
  """Runs one batch of zeros (compiles); returns the seconds it took."""
  start = time.perf_counter()
  zeros = np.zeros((predictor.batch_size, *predictor.image_size, 3), np.uint8)
  out = predictor.dispatch(zeros, np.zeros(predictor.batch_size, np.uint32))
  for value in out.values():
    np.asarray(value)
  return time.perf_counter() - start


def _predicted_batches(todo, images_dir, predictor, num_workers, framing):
  """Yields (paths, errors, outputs) per batch, one batch in flight ahead:
  the next batch is on the devices while this one is written."""
  abs_todo = [os.path.join(images_dir, p) for p in todo]
  boxes = [framing.box(p) for p in todo] if framing.table else None
  in_flight = None
  for start, images, errors in decoded_batches(
      abs_todo, predictor.image_size, predictor.batch_size, num_workers,
      resize=framing.resize, boxes=boxes, box_margin=framing.box_margin):
    paths = todo[start:start + len(errors)]
    out = predictor.dispatch(*predictor.pad(images, predict.path_ids(paths)))
    if in_flight is not None:
      yield in_flight
    in_flight = paths, errors, out
  if in_flight is not None:
    yield in_flight


def _append_rows(output_csv, header, keys, names, batches, bar) -> int:
  """Appends each batch's rows to the CSV (header first if new), flushed per
  batch; returns the number of unreadable images. `keys`: the output keys
  written (p_male and the MC statistics); `names`: the class names."""
  new_file = not os.path.exists(output_csv) or not os.path.getsize(output_csv)
  num_errors = 0
  with label_report.open_csv(output_csv, 'a') as f:
    writer = csv.writer(f)
    if new_file:
      writer.writerow(header)
      f.flush()
    for paths, errors, out in batches:
      out = {k: np.asarray(out[k]) for k in keys}
      writer.writerows(_format_rows(paths, errors, out, keys, names))
      f.flush()
      num_errors += sum(bool(e) for e in errors)
      bar.update(len(errors))
  return num_errors


def _announce(message: str, progress: bool) -> None:
  if progress:
    tqdm.tqdm.write(label_report.display_path(message))
  logging.info('%s', label_report.display_path(message))


def label_images(workdir: str, images_dir: str, output_csv: str,
                 mc_samples: int = 1, batch_size: int = 64, *,
                 seed: int = 0, num_workers: Optional[int] = None,
                 labels: Optional[str] = None, per_directory: bool = False,
                 progress: bool = True, runtime: str = 'jax',
                 tta: str = 'none', resize: Optional[str] = None,
                 boxes: Optional[str] = None,
                 box_margin: Optional[float] = None,
                 predictor: Optional[predict.Predictor] = None,
                 engine: str = 'local', ray_address: Optional[str] = None,
                 num_actors: Optional[int] = None) -> dict:
  """Labels every image under `images_dir` into `output_csv` (resumable).

  Args:
    workdir: a training workdir; its best checkpoint is used.
    images_dir: folder searched recursively for image files.
    output_csv: CSV to write (appended to when resuming).
    mc_samples: MC-Dropout samples per image; 1 = deterministic only.
    batch_size: images per device batch (fixed; the last one is padded).
    seed: dropout seed (per image: seed and a hash of its path).
    num_workers: decoding threads (default: CPU count, at most 8).
    labels: given labels: a CSV file, 'folders' (Male/Female folders), or
      None (folders if every image is under a Male or Female folder).
    per_directory: also write per-folder summaries and flagged images.
    progress: show a progress bar with images/s.
    runtime: 'jax', or 'onnxruntime' (the exported ONNX model under ONNX
      Runtime; mc_samples=1 only, MC-Dropout runs in JAX).
    tta: 'none', or 'flip' (mean logit of each image and its mirror).
    resize: 'stretch', 'crop' or 'pad' (`image_io.frame`); None: the
      training dataset's (`resolve_framing`).
    boxes: CSV of face boxes `path,x,y,w,h` (paths relative to
      `images_dir`, extension optional: VGGFace2's loose_bb_*.csv); images
      without a box are framed whole.
    box_margin: grows each box by this fraction of its size per side; None:
      the training dataset's.
    predictor: a ready `Predictor` (else built from `workdir`, with its
      calibration.json's temperature); its mc_samples, batch_size, seed,
      runtime, tta and temperature then replace the arguments.
    engine: 'local' (this process), or 'ray' (Ray Data: `label_ray`; the
      same rows, so either engine resumes the other's CSV).
    ray_address: engine='ray': a cluster to join ('auto', 'ray://host:10001');
      None starts an embedded Ray on this machine.
    num_actors: engine='ray': model actors (default: one per GPU of the
      cluster, else one per node).

  Returns:
    A summary: counts, timings (seconds, images_per_second of the images
    labelled in this call, compile excluded) and the written file paths.

  Raises:
    LabelError (a `errors.UserError`): a missing workdir or folder, a bad
      labels file, a CSV made with other arguments; locking.LockedError:
      another run is writing `output_csv`.
  """
  if engine not in ENGINES or (engine == 'ray' and predictor is not None):
    raise LabelError(f'engine={engine!r}: expected one of {ENGINES} (and no '
                     'ready predictor with engine=ray).')
  config = _read_config(workdir)
  _check_inputs(images_dir, labels, output_csv)
  framing, framing_line = resolve_framing(config, resize, boxes, box_margin)
  outputs = output_paths(output_csv)
  os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
  with locking.hold(outputs['lock'], f'label output {output_csv}'):
    if engine == 'ray':
      from gender_jax import label_ray  # pylint: disable=g-import-not-at-top
      summary = label_ray.run(
          config, workdir, images_dir, outputs, (framing, framing_line),
          progress, dict(mc_samples=mc_samples, batch_size=batch_size,
                         seed=seed, runtime=runtime, tta=tta),
          ray_address, num_actors, num_workers)
    else:
      if jax.process_count() > 1:   # (Starts JAX: after the cheap checks.)
        raise LabelError('the local engine runs on one host; start it on one '
                         'process, or use --engine=ray for several machines.')
      predictor = predictor or _load_predictor(
          workdir, mc_samples, batch_size, seed, runtime, tta)
      _announce(framing_line, progress)
      summary = _label(config, workdir, images_dir, outputs, predictor,
                       num_workers or min(8, os.cpu_count() or 1), progress,
                       framing)
    summary.update(label_report.summarize(
        output_csv, images_dir, labels=labels, per_directory=per_directory))
  return summary


def _prepare(config, workdir, images_dir, outputs, predictor, framing):
  """(header, files, paths in the CSV, rows dropped): checks the arguments
  sidecar and repairs the CSV (both engines). `predictor` needs only the
  attributes `_run_arguments` reads."""
  header = columns(predictor.mc_samples)
  excluded = own_outputs(images_dir, outputs)
  files = [p for p in image_io.list_images(images_dir) if p not in excluded]
  _check_args(outputs['args'],
              _run_arguments(workdir, images_dir, config, predictor, header,
                             framing),
              outputs['csv'])
  done, num_dropped = _done_paths(outputs['csv'], header, excluded,
                                  outputs['repair'])
  return header, files, done, num_dropped


def _todo(files, done, images_dir, progress) -> List[str]:
  """The files not in `done`, in order; says how many."""
  todo = [p for p in files if p not in done]
  _announce(f'{len(files)} images under {images_dir}: '
            f'{len(files) - len(todo)} already labelled, {len(todo)} to do.',
            progress)
  return todo


def _progress_bar(files, todo, progress: bool):
  return tqdm.tqdm(total=len(files), initial=len(files) - len(todo),
                   unit='img', disable=not progress, smoothing=0.1)


def _label(config, workdir, images_dir, outputs, predictor, num_workers,
           progress, framing) -> dict:
  """Labels the images not yet in the CSV; returns counts and timings."""
  from gender_jax import label_ray  # pylint: disable=g-import-not-at-top
  if label_ray.pending_shards(outputs):
    raise LabelError(
        f'{outputs["shards"]} holds the finished part of an interrupted '
        '--engine=ray run: rerun with --engine=ray to finish it, or delete '
        'that folder to discard it.')
  output_csv = outputs['csv']
  header, files, done, num_dropped = _prepare(config, workdir, images_dir,
                                              outputs, predictor, framing)
  todo = _todo(files, done, images_dir, progress)
  compile_seconds = _warm_up(predictor)
  names = labels_lib.CLASS_NAMES
  start = time.perf_counter()
  with _progress_bar(files, todo, progress) as bar:
    num_errors = _append_rows(
        output_csv, header, predictor.output_keys[1:], names,
        _predicted_batches(todo, images_dir, predictor, num_workers,
                           framing), bar)
  seconds = time.perf_counter() - start
  return _summary(output_csv, files, todo, num_dropped, num_errors, predictor,
                  framing, compile_seconds, seconds, 'local')


def _summary(output_csv, files, todo, num_dropped, num_errors, predictor,
             framing, compile_seconds, seconds, engine) -> dict:
  """A labelling call's counts and timings (both engines)."""
  return {
      'output_csv': output_csv,
      'engine': engine,
      'num_files': len(files),
      'num_labelled_now': len(todo),
      'num_resumed': len(files) - len(todo),
      'num_rows_dropped': num_dropped,
      'num_errors_now': num_errors,
      'mc_samples': predictor.mc_samples,
      'batch_size': predictor.batch_size,
      'temperature': predictor.temperature,
      'tta': predictor.tta,
      'resize': framing.resize,
      'boxes': framing.boxes,
      'box_margin': framing.box_margin,
      'compile_seconds': compile_seconds,
      'seconds': seconds,
      'images_per_second': len(todo) / seconds if seconds > 0 else 0.0,
  }
