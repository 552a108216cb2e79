"""Label a folder of face images with a trained model, resumably, into CSV.

`label_images` walks a folder recursively, decodes images in a thread pool
ahead of the devices, runs one jitted program per fixed-size batch (the last
batch padded) and appends one CSV row per image, in a deterministic order,
flushing after each batch:

  path, p_male, predicted[, mc_mean, mc_std, mc_entropy, mc_mutual_info], error

`path` is relative to the images folder; an unreadable file gets a row with
empty numbers and its `error` reason. Arguments that change the numbers are
stored next to the CSV (`<output>.args.json`); a second run with the same
arguments skips the images already in the CSV (a half-written last line of a
killed run is dropped and redone), so a killed run continues without
duplicate or missing rows. Different arguments are refused.

After labelling, `summarize` writes (from the CSV alone):
  <stem>_per_directory.csv  per folder: majority label, agreement, ...
  <stem>_flagged.csv        images disagreeing with their folder's majority
                            or with their given label       (per_directory)
  <stem>_mislabels.csv      labelled images ranked by how likely their given
                            label is wrong                  (given labels)
Given labels come from a CSV (`labels=FILE`, rows of image or folder path and
label) or from a Male/Female folder layout.
"""

import array
import collections
import concurrent.futures
import csv
import json
import math
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
import tqdm
from absl import logging

from gender_jax import image_io
from gender_jax import predict

CLASS_NAMES = ('female', 'male')   # Label 1 = male, as in training.
BASE_COLUMNS = ('path', 'p_male', 'predicted')
ERROR_COLUMN = 'error'
FOLDER_LABELS = 'folders'          # labels= value: take labels from folders.
DISPLAY_SIZE = (120, 100)          # (H, W) of faces in the mislabels PNG.
_LABEL_VALUES = {'0': 0, '1': 1, 'female': 0, 'male': 1, 'f': 0, 'm': 1,
                 'woman': 0, 'man': 1}
_PATH_COLUMNS = ('path', 'file', 'filename', 'image', 'folder', 'directory',
                 'identity', 'class_id')
_LABEL_COLUMNS = ('label', 'gender', 'sex')


def columns(mc_samples: int) -> Tuple[str, ...]:
  """The CSV header for `mc_samples`."""
  mc = predict.MC_KEYS if mc_samples > 1 else ()
  return BASE_COLUMNS + mc + (ERROR_COLUMN,)


def output_paths(output_csv: str) -> Dict[str, str]:
  """Paths of the sidecar and summary files of `output_csv`."""
  stem = output_csv[:-4] if output_csv.lower().endswith('.csv') else output_csv
  return {
      'args': output_csv + '.args.json',
      'per_directory': stem + '_per_directory.csv',
      'flagged': stem + '_flagged.csv',
      'mislabels': stem + '_mislabels.csv',
      'mislabels_png': stem + '_mislabels.png',
  }


# ---------------------------------------------------------------- resuming --


def _check_args(args_path: str, args: dict, output_csv: str) -> None:
  """Writes the arguments sidecar, or checks an existing one matches."""
  csv_exists = os.path.exists(output_csv) and os.path.getsize(output_csv) > 0
  if not csv_exists:
    with open(args_path, 'w') as f:
      json.dump(args, f, indent=2, sort_keys=True)
    return
  if not os.path.exists(args_path):
    raise ValueError(
        f'{output_csv} exists but {args_path} (the arguments it was made with) '
        'does not, so it cannot be resumed safely. Delete it or choose another '
        '--output.')
  with open(args_path) as f:
    old = json.load(f)
  diff = {k: (old.get(k), args.get(k)) for k in set(old) | set(args)
          if old.get(k) != args.get(k)}
  if diff:
    lines = '\n'.join(f'  {k}: was {a!r}, now {b!r}'
                      for k, (a, b) in sorted(diff.items()))
    raise ValueError(
        f'{output_csv} was made with other arguments; resuming would mix '
        f'results:\n{lines}\nRerun with the old arguments, or delete '
        f'{output_csv} and {args_path}, or choose another --output.')


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


def read_rows(output_csv: str) -> Iterator[dict]:
  """Rows of a labels CSV as dicts of strings."""
  with open(output_csv, newline='') as f:
    yield from csv.DictReader(f)


def _done_paths(output_csv: str, header: Sequence[str]) -> set:
  """Paths already labelled in `output_csv` (after dropping a partial row)."""
  if not os.path.exists(output_csv):
    return set()
  _drop_partial_last_line(output_csv)
  with open(output_csv, newline='') as f:
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
      return set()
    if tuple(first) != tuple(header):
      raise ValueError(
          f'{output_csv} has columns {first}, expected {list(header)}. Delete '
          'it or choose another --output.')
    return {row[0] for row in reader if row}


# ---------------------------------------------------------------- decoding --


def _load(path: str, image_size) -> Tuple[Optional[np.ndarray], str]:
  try:
    return image_io.load_image(path, image_size), ''
  except Exception as e:  # pylint: disable=broad-except
    return None, image_io.error_reason(e)


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
        pending.append((start, [pool.submit(_load, p, image_size)
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


def _format_rows(paths, errors, outputs, keys) -> List[list]:
  rows = []
  for i, (path, error) in enumerate(zip(paths, errors)):
    if error:
      rows.append([path] + [''] * (len(keys) + 1) + [error])
      continue
    p = float(outputs['p_male'][i])
    row = [path, f'{p:.7g}', CLASS_NAMES[int(p >= 0.5)]]
    row += [f'{float(outputs[k][i]):.7g}' for k in keys[1:]]
    rows.append(row + [''])
  return rows


def label_images(workdir: str, images_dir: str, output_csv: str,
                 mc_samples: int = 1, batch_size: int = 64, *,
                 seed: int = 0, num_workers: Optional[int] = None,
                 labels: Optional[str] = None, per_directory: bool = False,
                 progress: bool = True,
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
    predictor: a ready `Predictor` (else built from `workdir`); its
      mc_samples, batch_size and seed then replace the arguments.

  Returns:
    A summary: counts, timings (seconds, images_per_second of the images
    labelled in this call, compile excluded) and the written file paths.
  """
  if jax.process_count() > 1:
    raise ValueError('label_images runs on one host; start it on one process '
                     'and split large folders between runs instead.')
  from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = checkpointing.read_config(workdir)
  if predictor is None:
    predictor = predict.Predictor.from_workdir(
        workdir, mc_samples=mc_samples, batch_size=batch_size, seed=seed)
  mc_samples, batch_size, seed = (predictor.mc_samples, predictor.batch_size,
                                  predictor.seed)
  if num_workers is None:
    num_workers = min(8, os.cpu_count() or 1)
  header = columns(mc_samples)
  files = image_io.list_images(images_dir)
  outputs = output_paths(output_csv)
  args = {
      'workdir': os.path.abspath(workdir),
      'images_dir': os.path.abspath(images_dir),
      'mc_samples': mc_samples,
      'seed': seed,
      'model': config.model,
      'image_size': list(config.image_size),
      'columns': list(header),
      'checkpoint_step': predictor.meta.get('step'),
  }
  os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
  _check_args(outputs['args'], args, output_csv)
  done = _done_paths(output_csv, header)
  todo = [p for p in files if p not in done]
  message = (f'{len(files)} images under {images_dir}: '
             f'{len(files) - len(todo)} already labelled, {len(todo)} to do.')
  if progress:
    tqdm.tqdm.write(message)
  logging.info(message)

  start_compile = time.perf_counter()
  zeros = np.zeros((batch_size, *config.image_size, 3), np.uint8)
  jax.block_until_ready(predictor.dispatch(zeros, np.zeros(batch_size)))
  compile_seconds = time.perf_counter() - start_compile

  keys = predictor.output_keys[1:]    # p_male and MC statistics.
  num_errors = 0
  start = time.perf_counter()
  new_file = not os.path.exists(output_csv) or not os.path.getsize(output_csv)
  with open(output_csv, 'a', newline='') as f, tqdm.tqdm(
      total=len(files), initial=len(files) - len(todo), unit='img',
      disable=not progress, smoothing=0.1) as bar:
    writer = csv.writer(f)
    if new_file:
      writer.writerow(header)
      f.flush()
    in_flight = None

    def write(batch):
      nonlocal num_errors
      b_start, b_errors, b_out = batch
      b_paths = todo[b_start:b_start + len(b_errors)]
      b_out = {k: np.asarray(b_out[k]) for k in keys}
      writer.writerows(_format_rows(b_paths, b_errors, b_out, keys))
      f.flush()
      num_errors += sum(bool(e) for e in b_errors)
      bar.update(len(b_errors))

    abs_todo = [os.path.join(images_dir, p) for p in todo]
    for b_start, images, errors in decoded_batches(
        abs_todo, config.image_size, batch_size, num_workers):
      ids = predict.path_ids(todo[b_start:b_start + batch_size])
      out = predictor.dispatch(*predictor.pad(images, ids))
      if in_flight is not None:
        write(in_flight)            # Overlaps with the batch just dispatched.
      in_flight = (b_start, errors, out)
    if in_flight is not None:
      write(in_flight)
  seconds = time.perf_counter() - start

  summary = {
      'output_csv': output_csv,
      'num_files': len(files),
      'num_labelled_now': len(todo),
      'num_resumed': len(files) - len(todo),
      'num_errors_now': num_errors,
      'mc_samples': mc_samples,
      'batch_size': batch_size,
      'compile_seconds': compile_seconds,
      'seconds': seconds,
      'images_per_second': len(todo) / seconds if seconds > 0 else 0.0,
  }
  summary.update(summarize(output_csv, images_dir, labels=labels,
                           per_directory=per_directory))
  return summary


# ------------------------------------------------------------- given labels --


def parse_label(value: str) -> int:
  """0/1, female/male, f/m (any case) -> 0/1; ValueError otherwise."""
  key = value.strip().lower()
  if key not in _LABEL_VALUES:
    raise ValueError(f'label {value!r}: expected 0/1, female/male or f/m')
  return _LABEL_VALUES[key]


def _normalize(path: str, images_dir: Optional[str]) -> str:
  path = path.strip().replace('\\', '/')
  if images_dir and os.path.isabs(path):
    path = os.path.relpath(path, images_dir).replace(os.sep, '/')
  while path.startswith('./'):
    path = path[2:]
  return path.rstrip('/')


def read_labels(labels_csv: str, images_dir: Optional[str] = None
                ) -> Dict[str, int]:
  """{image or folder path: label} from a CSV with a header.

  The path column is one of path/file/filename/image/folder/directory/
  identity/class_id and the label column one of label/gender/sex (any case;
  VGGFace2's identity_meta.csv with Class_ID and Gender works as it is).
  Paths are relative to the images folder (absolute ones are made so); a
  folder's label applies to every image below it.
  """
  with open(labels_csv, newline='') as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    path_col = next((header.index(c) for c in _PATH_COLUMNS if c in header),
                    None)
    label_col = next((header.index(c) for c in _LABEL_COLUMNS if c in header),
                     None)
    if path_col is None or label_col is None:
      raise ValueError(
          f'{labels_csv}: header {header} needs a path column (one of '
          f'{_PATH_COLUMNS}) and a label column (one of {_LABEL_COLUMNS}).')
    labels = {}
    for line, row in enumerate(reader, start=2):
      if not row or not ''.join(row).strip():
        continue
      try:
        labels[_normalize(row[path_col], images_dir)] = parse_label(
            row[label_col])
      except (ValueError, IndexError) as e:
        raise ValueError(f'{labels_csv}, line {line}: {e}') from e
  return labels


def folder_label(path: str) -> Optional[int]:
  """1/0 from the deepest Male/Female folder in `path`, else None."""
  for part in reversed(path.split('/')[:-1]):
    if part.lower() in ('male', 'female'):
      return int(part.lower() == 'male')
  return None


def given_labels(paths: Sequence[str], labels: Optional[str],
                 images_dir: Optional[str]) -> Optional[List[Optional[int]]]:
  """Each path's given label (None where unknown), or None without labels."""
  if labels is None or labels == FOLDER_LABELS:
    found = [folder_label(p) for p in paths]
    if labels is None and (not paths or any(v is None for v in found)):
      return None
    return found
  table = read_labels(labels, images_dir)
  out = []
  for p in paths:
    parts = p.split('/')
    value = None
    for n in range(len(parts), 0, -1):
      value = table.get('/'.join(parts[:n]))
      if value is not None:
        break
    out.append(value)
  return out


# ---------------------------------------------------------------- summaries --


def _load_results(output_csv: str):
  """(paths, ok mask, {column: float64 array}) of a labels CSV, streamed."""
  with open(output_csv, newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None) or list(columns(1))
    names = [k for k in ('p_male',) + predict.MC_KEYS if k in header]
    cols = [header.index(k) for k in names]
    error_col = header.index(ERROR_COLUMN)
    paths, ok = [], []
    values = [array.array('d') for _ in names]
    for row in reader:
      paths.append(row[0])
      ok.append(not row[error_col])
      for store, c in zip(values, cols):
        store.append(float(row[c]) if row[c] else math.nan)
  return (paths, np.asarray(ok, bool),
          {k: np.frombuffer(v, np.float64) if len(v) else np.zeros(0)
           for k, v in zip(names, values)})


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _fmt(x) -> str:
  return '' if x is None or (isinstance(x, float) and np.isnan(x)) else (
      f'{x:.7g}' if isinstance(x, float) else str(x))


def mislabel_scores(p_male: np.ndarray, given: np.ndarray) -> np.ndarray:
  """1 - p(given label): near 1 when the model strongly contradicts it."""
  return np.where(given == 1, 1.0 - p_male, p_male)


def summarize(output_csv: str, images_dir: Optional[str] = None, *,
              labels: Optional[str] = None,
              per_directory: bool = False, top_images: int = 30) -> dict:
  """Writes the per-folder, flagged and mislabel CSVs of a labels CSV.

  Mislabel ranking: labelled, readable images sorted by score = 1 - p(given
  label), with p the MC-Dropout mean when present (it already averages over
  the model's uncertainty) else p_male; ties broken by higher mutual
  information (BALD). With `images_dir`, the `top_images` best candidates
  are drawn into <stem>_mislabels.png. Returns counts and the written paths.
  """
  outputs = output_paths(output_csv)
  paths, ok, values = _load_results(output_csv)
  mc = 'mc_mean' in values
  p = values['mc_mean'] if mc else values['p_male']
  predicted = (values['p_male'] >= 0.5).astype(int)
  given = given_labels(paths, labels, images_dir)
  summary = {'num_rows': len(paths), 'num_errors': int((~ok).sum()),
             'num_male': int((predicted[ok] == 1).sum()),
             'num_female': int((predicted[ok] == 0).sum())}
  given_arr = None
  if given is not None:
    given_arr = np.asarray([-1 if g is None else g for g in given])
    summary['num_with_given_label'] = int((given_arr >= 0).sum())

  if per_directory:
    summary.update(_write_per_directory(outputs, paths, ok, values, predicted,
                                        given_arr))

  if given_arr is not None:
    has = ok & (given_arr >= 0)
    idx = np.flatnonzero(has)
    scores = mislabel_scores(p[idx], given_arr[idx])
    bald = values['mc_mutual_info'][idx] if mc else np.zeros(len(idx))
    order = idx[np.lexsort((-bald, -scores))]
    score_of = np.full(len(paths), np.nan)
    score_of[idx] = scores
    mc_cols = list(predict.MC_KEYS) if mc else []
    header = (['rank', 'path', 'given', 'predicted', 'score', 'p_male']
              + mc_cols)
    rows = ([rank, paths[i], CLASS_NAMES[given_arr[i]],
             CLASS_NAMES[predicted[i]], _fmt(score_of[i]),
             _fmt(values['p_male'][i])] + [_fmt(values[k][i]) for k in mc_cols]
            for rank, i in enumerate(order, start=1))
    _write_csv(outputs['mislabels'], header, rows)
    summary['mislabels_csv'] = outputs['mislabels']
    if images_dir and top_images:
      top = order[:top_images]
      _plot_candidates(
          [os.path.join(images_dir, paths[i]) for i in top],
          [f'#{r} given {CLASS_NAMES[given_arr[i]]}\np(male)={p[i]:.3f}\n'
           f'{_short(paths[i])}' for r, i in enumerate(top, start=1)],
          outputs['mislabels_png'],
          'Most likely mislabeled: given label, p(male)'
          + (' (MC-Dropout mean)' if mc else ''))
      summary['mislabels_png'] = outputs['mislabels_png']
    summary['num_disagree_given'] = int(
        (predicted[has] != given_arr[has]).sum())
  return summary


def _short(path: str, width: int = 22) -> str:
  """The end of a path, at most `width` characters, for picture titles."""
  return path if len(path) <= width else '...' + path[-(width - 3):]


def _plot_candidates(paths: Sequence[str], titles: Sequence[str],
                     png: str, title: str) -> None:
  """A grid of the top mislabel candidates, to look at them."""
  from gender_jax import plots  # pylint: disable=g-import-not-at-top
  images, _ = image_io.load_images(paths, DISPLAY_SIZE)
  plots.plot_image_grid(images, titles, png, title)


def _write_per_directory(outputs, paths, ok, values, predicted, given_arr):
  """Per-folder majority/agreement CSV and the flagged-images CSV."""
  folders = [p.rsplit('/', 1)[0] if '/' in p else '.' for p in paths]
  groups = collections.defaultdict(list)
  for i, folder in enumerate(folders):
    groups[folder].append(i)
  majority_of = {}
  dir_rows = []
  for folder in sorted(groups):
    idx = np.asarray(groups[folder])
    good = idx[ok[idx]]
    n_male = int(predicted[good].sum())
    n_female = len(good) - n_male
    if len(good):
      mean_p = float(values['p_male'][good].mean())
      # Majority by count; a tie goes to the mean probability.
      majority = int(n_male > n_female or (n_male == n_female and mean_p >= 0.5))
      agreement = (n_male if majority else n_female) / len(good)
      majority_of[folder] = majority
    else:
      mean_p, majority, agreement = None, None, None
    row = [folder, len(idx), len(idx) - len(good), n_male, n_female,
           '' if majority is None else CLASS_NAMES[majority], _fmt(agreement),
           _fmt(mean_p)]
    if given_arr is not None:
      sel = good[given_arr[good] >= 0]
      row.append(int((predicted[sel] != given_arr[sel]).sum()) if len(sel)
                 else '')
    dir_rows.append(row)
  header = ['directory', 'images', 'errors', 'male', 'female', 'majority',
            'agreement', 'mean_p_male']
  if given_arr is not None:
    header.append('disagree_given')
  _write_csv(outputs['per_directory'], header, dir_rows)

  flagged = []
  for i in np.flatnonzero(ok):
    reasons = []
    majority = majority_of.get(folders[i])
    if majority is not None and predicted[i] != majority:
      reasons.append('disagrees with folder majority')
    given = None if given_arr is None or given_arr[i] < 0 else given_arr[i]
    if given is not None and predicted[i] != given:
      reasons.append('disagrees with given label')
    if reasons:
      flagged.append([paths[i], CLASS_NAMES[predicted[i]],
                      _fmt(values['p_male'][i]), CLASS_NAMES[majority],
                      '' if given is None else CLASS_NAMES[given],
                      '; '.join(reasons)])
  _write_csv(outputs['flagged'],
             ['path', 'predicted', 'p_male', 'folder_majority', 'given',
              'reasons'], flagged)
  return {'num_directories': len(groups), 'num_flagged': len(flagged),
          'per_directory_csv': outputs['per_directory'],
          'flagged_csv': outputs['flagged']}
