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
"""

import collections
import concurrent.futures
import csv
import json
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import jax
import numpy as np
import tqdm
from absl import logging

from gender_jax import errors
from gender_jax import image_io
from gender_jax import label_report
from gender_jax import locking
from gender_jax import predict
from gender_jax import labels as labels_lib

BASE_COLUMNS = ('path', 'p_male', 'predicted')
ERROR_COLUMN = 'error'


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


def _load_predictor(workdir, mc_samples, batch_size, seed, runtime):
  """The workdir's best model as a Predictor; a missing checkpoint or a bad
  mc_samples/batch_size/runtime is a LabelError."""
  try:
    return predict.Predictor.from_workdir(
        workdir, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
        runtime=runtime)
  except (FileNotFoundError, ValueError) as e:
    raise LabelError(e) from e


def _check_inputs(images_dir: str, labels: Optional[str]) -> None:
  """Fails early (before labelling) on a missing folder or a bad labels file."""
  if not os.path.isdir(images_dir):
    raise LabelError(f'--images {images_dir!r} is not a directory: pass the '
                     'folder holding the images.')
  if labels not in (None, label_report.FOLDER_LABELS):
    try:
      label_report.read_labels(labels, images_dir)
    except (OSError, ValueError) as e:
      raise LabelError(f'--labels: {e}') from e


def _run_arguments(workdir, images_dir, config, predictor, header) -> dict:
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
  if predictor.runtime != 'jax':    # So sidecars from before runtimes match.
    args['runtime'] = predictor.runtime
  return args


def _check_args(args_path: str, args: dict, output_csv: str) -> None:
  """Writes the arguments sidecar, or checks an existing one matches."""
  csv_exists = os.path.exists(output_csv) and os.path.getsize(output_csv) > 0
  if not csv_exists:
    with open(args_path, 'w') as f:
      json.dump(args, f, indent=2, sort_keys=True)
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


def _drop_partial_last_line(path: str) -> None:
  """Truncates a killed run's half-written last row (no trailing newline)."""
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return
    pos, block = size, 1 << 16
    while pos > 0:
      start = max(0, pos - block)
      f.seek(start)
      chunk = f.read(pos - start)
      i = chunk.rfind(b'\n')
      if i >= 0:
        f.truncate(start + i + 1)
        return
      pos = start
    f.truncate(0)


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
  _drop_partial_last_line(output_csv)
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
                    num_workers: int, prefetch: int = 2):
  """Yields (start, images, errors) per batch of `paths`, decoded ahead.

  `images` is always (batch_size, H, W, 3) uint8 (unreadable files and the
  padding of the last batch are zeros); `errors` lists one reason per path
  of the batch ('' when it decoded). Up to `prefetch` batches beyond the one
  yielded are being decoded by `num_workers` threads meanwhile.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = collections.deque()
    starts = iter(range(0, len(paths), batch_size))

    def submit():
      start = next(starts, None)
      if start is not None:
        chunk = paths[start:start + batch_size]
        pending.append((start, [pool.submit(image_io.decode, p, image_size)
                                for p in chunk]))

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


def _predicted_batches(todo, images_dir, predictor, num_workers):
  """Yields (paths, errors, outputs) per batch, one batch in flight ahead:
  the next batch is on the devices while this one is written."""
  abs_todo = [os.path.join(images_dir, p) for p in todo]
  in_flight = None
  for start, images, errors in decoded_batches(
      abs_todo, predictor.image_size, predictor.batch_size, num_workers):
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
                 predictor: Optional[predict.Predictor] = None) -> dict:
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
    predictor: a ready `Predictor` (else built from `workdir`); its
      mc_samples, batch_size, seed and runtime then replace the arguments.

  Returns:
    A summary: counts, timings (seconds, images_per_second of the images
    labelled in this call, compile excluded) and the written file paths.

  Raises:
    LabelError (a `errors.UserError`): a missing workdir or folder, a bad
      labels file, a CSV made with other arguments; locking.LockedError:
      another run is writing `output_csv`.
  """
  config = _read_config(workdir)
  _check_inputs(images_dir, labels)
  outputs = output_paths(output_csv)
  os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
  with locking.hold(outputs['lock'], f'label output {output_csv}'):
    if jax.process_count() > 1:   # (Starts JAX: after the cheap checks.)
      raise LabelError('label_images runs on one host; start it on one '
                       'process and split large folders between runs instead.')
    predictor = predictor or _load_predictor(workdir, mc_samples, batch_size,
                                             seed, runtime)
    summary = _label(config, workdir, images_dir, outputs, predictor,
                     num_workers or min(8, os.cpu_count() or 1), progress)
    summary.update(label_report.summarize(
        output_csv, images_dir, labels=labels, per_directory=per_directory))
  return summary


def _label(config, workdir, images_dir, outputs, predictor, num_workers,
           progress) -> dict:
  """Labels the images not yet in the CSV; returns counts and timings."""
  output_csv = outputs['csv']
  header = columns(predictor.mc_samples)
  excluded = own_outputs(images_dir, outputs)
  files = [p for p in image_io.list_images(images_dir) if p not in excluded]
  _check_args(outputs['args'],
              _run_arguments(workdir, images_dir, config, predictor, header),
              output_csv)
  done, num_dropped = _done_paths(output_csv, header, excluded,
                                  outputs['repair'])
  todo = [p for p in files if p not in done]
  _announce(f'{len(files)} images under {images_dir}: '
            f'{len(files) - len(todo)} already labelled, {len(todo)} to do.',
            progress)
  compile_seconds = _warm_up(predictor)
  names = labels_lib.CLASS_NAMES
  start = time.perf_counter()
  with tqdm.tqdm(total=len(files), initial=len(files) - len(todo), unit='img',
                 disable=not progress, smoothing=0.1) as bar:
    num_errors = _append_rows(
        output_csv, header, predictor.output_keys[1:], names,
        _predicted_batches(todo, images_dir, predictor, num_workers), bar)
  seconds = time.perf_counter() - start
  return {
      'output_csv': output_csv,
      'num_files': len(files),
      'num_labelled_now': len(todo),
      'num_resumed': len(files) - len(todo),
      'num_rows_dropped': num_dropped,
      'num_errors_now': num_errors,
      'mc_samples': predictor.mc_samples,
      'batch_size': predictor.batch_size,
      'compile_seconds': compile_seconds,
      'seconds': seconds,
      'images_per_second': len(todo) / seconds if seconds > 0 else 0.0,
  }
