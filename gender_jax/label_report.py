"""Post-hoc summaries of a labels CSV written by `gender_jax.label`.

`summarize` reads the labels CSV alone (no model) and writes next to it:
  <stem>_per_directory.csv  per folder: majority label, agreement, ...
  <stem>_flagged.csv        images disagreeing with their folder's majority
                            or with their given label       (per_directory)
  <stem>_mislabels.csv      labelled images ranked by how likely their given
                            label is wrong                  (given labels)
  <stem>_mislabels.png      the top candidates' faces       (given labels)
  <stem>_review.csv         images the model doubts: confidence
                            max(p, 1-p) below a cut, least
                            confident first                 (review_below)
Given labels come from a CSV (`labels=FILE`, rows of image or folder path and
label) or from a Male/Female folder layout.

Every CSV here is opened with `open_csv`: UTF-8, with file names that are not
valid UTF-8 (common on old shares) carried through byte for byte.
"""

import array
import collections
import csv
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from gender_jax import image_io
from gender_jax import plots
from gender_jax import predict
from gender_jax import labels as labels_lib

FOLDER_LABELS = 'folders'          # labels= value: take labels from folders.
DISPLAY_SIZE = (120, 100)          # (H, W) of faces in the mislabels PNG.


def open_csv(path: str, mode: str = 'r'):
  """Opens a labeller CSV: UTF-8, and a file name's non-UTF-8 bytes round-trip.

  os.listdir gives such names as str with surrogate escapes; 'surrogateescape'
  writes those back as the original bytes and reads them as the same str, so
  the CSV names the real file and a resumed run recognises it.
  """
  return open(path, mode, newline='', encoding='utf-8',
              errors='surrogateescape')


def display_path(path: str) -> str:
  """`path` printable anywhere: non-UTF-8 bytes shown as \\xNN escapes."""
  return path.encode('utf-8', 'surrogateescape').decode('utf-8',
                                                        'backslashreplace')


def report_paths(output_csv: str) -> Dict[str, str]:
  """Paths of the summary files of labels CSV `output_csv`."""
  stem = output_csv[:-4] if output_csv.lower().endswith('.csv') else output_csv
  return {
      'per_directory': stem + '_per_directory.csv',
      'flagged': stem + '_flagged.csv',
      'mislabels': stem + '_mislabels.csv',
      'mislabels_png': stem + '_mislabels.png',
      'review': stem + '_review.csv',
  }


def read_rows(output_csv: str) -> Iterator[dict]:
  """Rows of a labels CSV as dicts of strings."""
  with open_csv(output_csv) as f:
    yield from csv.DictReader(f)


def read_results(output_csv: str):
  """(paths, ok mask, {column: float64 array}) of a labels CSV, streamed.

  The columns are p_male and the MC-Dropout statistics present; unreadable
  images (a non-empty `error`) are not ok and have NaN numbers.
  """
  with open_csv(output_csv) as f:
    reader = csv.reader(f)
    header = next(reader, None) or ['path', 'p_male', 'predicted', 'error']
    names = [k for k in ('p_male',) + predict.MC_KEYS if k in header]
    cols = [header.index(k) for k in names]
    error_col = header.index('error')
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


# ------------------------------------------------------------- given labels --


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

  The path and label columns are named as `labels.csv_columns` reads them
  (VGGFace2's identity_meta.csv with Class_ID and Gender works as it is).
  Paths are relative to the images folder (absolute ones are made so); a
  folder's label applies to every image below it.
  """
  with open_csv(labels_csv) as f:
    reader = csv.reader(f)
    header = next(reader, [])
    columns = labels_lib.csv_columns(header)
    path_col = (columns['folder'] if columns['path'] is None
                else columns['path'])
    label_col = columns['label']
    if path_col is None or label_col is None:
      names = labels_lib.CSV_COLUMNS
      raise ValueError(
          f'{labels_csv}: header {header} needs a path column (one of '
          f"{names['path'] + names['folder']}) and a label column (one of "
          f"{names['label']}).")
    labels = {}
    for line, row in enumerate(reader, start=2):
      if not row or not ''.join(row).strip():
        continue
      try:
        labels[_normalize(row[path_col], images_dir)] = labels_lib.parse_label(
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


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  with open_csv(path, 'w') as f:
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
              per_directory: bool = False, top_images: int = 30,
              review_below: Optional[float] = None) -> dict:
  """Writes the per-folder, flagged, mislabel and review files of a labels
  CSV.

  With `images_dir`, the `top_images` best mislabel candidates are drawn
  into <stem>_mislabels.png. With `review_below`, the images whose
  confidence is below it go to <stem>_review.csv. Returns counts and the
  written paths.
  """
  outputs = report_paths(output_csv)
  paths, ok, values = read_results(output_csv)
  predicted = (values['p_male'] >= 0.5).astype(int)
  given = given_labels(paths, labels, images_dir)
  summary = {'num_rows': len(paths), 'num_errors': int((~ok).sum()),
             'num_male': int((predicted[ok] == 1).sum()),
             'num_female': int((predicted[ok] == 0).sum())}
  given_arr = None
  if given is not None:
    given_arr = np.asarray([-1 if g is None else g for g in given], int)
    summary['num_with_given_label'] = int((given_arr >= 0).sum())
  if per_directory:
    summary.update(_write_per_directory(outputs, paths, ok, values, predicted,
                                        given_arr))
  if given_arr is not None:
    summary.update(_write_mislabels(outputs, paths, ok, values, predicted,
                                    given_arr, images_dir, top_images))
  if review_below is not None:
    summary.update(_write_review(outputs['review'], paths, ok, values,
                                 predicted, review_below))
  return summary


def _write_review(path, paths, ok, values, predicted, review_below) -> dict:
  """The readable images with confidence max(p, 1-p) of p(male) (calibrated
  where the workdir has a temperature) below `review_below`, least confident
  first (ties in CSV order).

  p(male), not an MC-Dropout statistic: ranked by it, the faces kept are as
  accurate or more (benchmarks/flagging.py).
  """
  confidence = np.maximum(values['p_male'], 1.0 - values['p_male'])
  idx = np.flatnonzero(ok & (confidence < review_below))
  idx = idx[np.argsort(confidence[idx], kind='stable')]
  mc_cols = [k for k in predict.MC_KEYS if k in values]
  names = labels_lib.CLASS_NAMES
  _write_csv(path, ['rank', 'path', 'predicted', 'confidence', 'p_male']
             + mc_cols,
             ([rank, paths[i], names[predicted[i]], _fmt(confidence[i]),
               _fmt(values['p_male'][i])] + [_fmt(values[k][i])
                                             for k in mc_cols]
              for rank, i in enumerate(idx, start=1)))
  return {'review_csv': path, 'num_to_review': len(idx)}


def mislabel_order(p: np.ndarray, given: np.ndarray, ok: np.ndarray,
                   mutual_info: Optional[np.ndarray] = None):
  """(indices, scores): readable images with a given label, likeliest
  mislabel first.

  score = 1 - p(given label), with p the MC-Dropout mean when present (it
  already averages over the model's uncertainty) else p_male; ties go to
  the higher mutual information (BALD).
  """
  idx = np.flatnonzero(ok & (given >= 0))
  scores = mislabel_scores(p[idx], given[idx])
  bald = np.zeros(len(idx)) if mutual_info is None else mutual_info[idx]
  order = np.lexsort((-bald, -scores))
  return idx[order], scores[order]


def _write_mislabels(outputs, paths, ok, values, predicted, given,
                     images_dir, top_images) -> dict:
  """The mislabel ranking CSV and (with `images_dir`) its picture."""
  mc = 'mc_mean' in values
  p = values['mc_mean'] if mc else values['p_male']
  order, scores = mislabel_order(p, given, ok,
                                 values['mc_mutual_info'] if mc else None)
  mc_cols = list(predict.MC_KEYS) if mc else []
  names = labels_lib.CLASS_NAMES
  header = ['rank', 'path', 'given', 'predicted', 'score', 'p_male'] + mc_cols
  rows = ([rank, paths[i], names[given[i]], names[predicted[i]],
           _fmt(float(score)), _fmt(values['p_male'][i])]
          + [_fmt(values[k][i]) for k in mc_cols]
          for rank, (i, score) in enumerate(zip(order, scores), start=1))
  _write_csv(outputs['mislabels'], header, rows)
  has = ok & (given >= 0)
  summary = {'mislabels_csv': outputs['mislabels'],
             'num_disagree_given': int((predicted[has] != given[has]).sum())}
  if images_dir and top_images:
    top = order[:top_images]
    _plot_candidates(
        [os.path.join(images_dir, paths[i]) for i in top],
        [f'#{r} given {names[given[i]]}\np(male)={p[i]:.3f}\n'
         f'{_short(display_path(paths[i]))}'
         for r, i in enumerate(top, start=1)],
        outputs['mislabels_png'],
        'Most likely mislabeled: given label, p(male)'
        + (' (MC-Dropout mean)' if mc else ''))
    summary['mislabels_png'] = outputs['mislabels_png']
  return summary


def _short(path: str, width: int = 22) -> str:
  """The end of a path, at most `width` characters, for picture titles."""
  return path if len(path) <= width else '...' + path[-(width - 3):]


def _plot_candidates(paths: Sequence[str], titles: Sequence[str],
                     png: str, title: str) -> None:
  """A grid of the top mislabel candidates, to look at them."""
  images, _ = image_io.load_images(paths, DISPLAY_SIZE)
  plots.write_png(plots.image_grid(images, titles, title), png)


def _folder(path: str) -> str:
  return path.rsplit('/', 1)[0] if '/' in path else '.'


def _write_per_directory(outputs, paths, ok, values, predicted, given):
  """Per-folder majority/agreement CSV and the flagged-images CSV."""
  groups = collections.defaultdict(list)
  for i, path in enumerate(paths):
    groups[_folder(path)].append(i)
  header = ['directory', 'images', 'errors', 'male', 'female', 'majority',
            'agreement', 'mean_p_male']
  if given is not None:
    header.append('disagree_given')
  majority_of, rows = {}, []
  for folder in sorted(groups):
    row, majority = _directory_row(folder, np.asarray(groups[folder]), ok,
                                   values['p_male'], predicted, given)
    rows.append(row)
    if majority is not None:
      majority_of[folder] = majority
  _write_csv(outputs['per_directory'], header, rows)
  flagged = _flagged_rows(paths, ok, values['p_male'], predicted, given,
                          majority_of)
  _write_csv(outputs['flagged'],
             ['path', 'predicted', 'p_male', 'folder_majority', 'given',
              'reasons'], flagged)
  return {'num_directories': len(groups), 'num_flagged': len(flagged),
          'per_directory_csv': outputs['per_directory'],
          'flagged_csv': outputs['flagged']}


def _directory_row(folder, idx, ok, p_male, predicted, given):
  """(CSV row, majority label or None) of one folder's images `idx`."""
  good = idx[ok[idx]]
  n_male = int(predicted[good].sum())
  n_female = len(good) - n_male
  mean_p, majority, agreement = None, None, None
  if len(good):
    mean_p = float(p_male[good].mean())
    # Majority by count; a tie goes to the mean probability.
    majority = int(n_male > n_female or (n_male == n_female and mean_p >= 0.5))
    agreement = (n_male if majority else n_female) / len(good)
  row = [folder, len(idx), len(idx) - len(good), n_male, n_female,
         '' if majority is None else labels_lib.CLASS_NAMES[majority],
         _fmt(agreement),
         _fmt(mean_p)]
  if given is not None:
    sel = good[given[good] >= 0]
    row.append(int((predicted[sel] != given[sel]).sum()) if len(sel) else '')
  return row, majority


def _flagged_rows(paths, ok, p_male, predicted, given, majority_of):
  """Rows of readable images that disagree with their folder or label."""
  names, flagged = labels_lib.CLASS_NAMES, []
  for i in np.flatnonzero(ok):
    reasons = []
    majority = majority_of.get(_folder(paths[i]))
    if majority is not None and predicted[i] != majority:
      reasons.append('disagrees with folder majority')
    label = None if given is None or given[i] < 0 else given[i]
    if label is not None and predicted[i] != label:
      reasons.append('disagrees with given label')
    if reasons:
      flagged.append([paths[i], names[predicted[i]], _fmt(p_male[i]),
                      names[majority], '' if label is None else names[label],
                      '; '.join(reasons)])
  return flagged
