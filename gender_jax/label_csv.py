"""The labels CSV: its rows, its arguments sidecar and its repair on resume.

One row per image, in the file list's order:

  path, p_male, predicted[, mc_mean, mc_std, mc_entropy, mc_mutual_info], error

`path` is relative to the images folder (file names that are not valid UTF-8
are kept byte for byte, see `label_report.open_csv`); an unreadable file gets
empty numbers and its `error` reason. Both engines format rows here, so they
write the same bytes. The arguments that change the numbers are stored beside
the CSV (`<output>.args.json`) and a resumed run must have the same
(`check_args`); resuming drops a killed run's half-written last record and
repeated rows (`done_paths`).
"""

import collections
import csv
import io
import json
import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Set
from typing import Tuple

from absl import logging

from gender_jax import errors
from gender_jax import fileio
from gender_jax import label_report
from gender_jax import predict
from gender_jax import labels as labels_lib

BASE_COLUMNS = ('path', 'p_male', 'predicted')
ERROR_COLUMN = 'error'
# Arguments the sidecar records only when not these defaults, so that the
# sidecars of versions without them still match.
_OMITTED_DEFAULTS = {'runtime': 'jax', 'temperature': 1.0, 'tta': 'none',
                     'resize': 'stretch'}


class ResumeError(errors.UserError, ValueError):
  """An existing CSV that this run cannot continue; the message says why."""


def columns(mc_samples: int) -> tuple:
  """The CSV header for `mc_samples`."""
  mc = predict.MC_KEYS if mc_samples > 1 else ()
  return BASE_COLUMNS + mc + (ERROR_COLUMN,)


def format_rows(paths: Sequence[str], reasons: Sequence[str], outputs,
                header: Sequence[str]) -> List[list]:
  """CSV rows of one batch: `outputs` (arrays of p_male and the MC statistics
  of `header`), or empty numbers and the reason of an unreadable file."""
  rows = []
  for i, (path, reason) in enumerate(zip(paths, reasons)):
    if reason:
      rows.append([path] + [''] * (len(header) - 2) + [reason])
      continue
    p = float(outputs['p_male'][i])
    rows.append([path, f'{p:.7g}', labels_lib.CLASS_NAMES[int(p >= 0.5)]]
                + [f'{float(outputs[k][i]):.7g}' for k in header[3:-1]]
                + [''])
  return rows


def csv_bytes(rows: Iterable[Sequence[str]]) -> bytes:
  """`rows` as they are written into a labels CSV, as bytes."""
  buffer = io.StringIO(newline='')
  csv.writer(buffer).writerows(rows)
  return buffer.getvalue().encode('utf-8', 'surrogateescape')


def append_rows(output_csv: str, header: Sequence[str], batches: Iterable,
                on_batch: Callable[[int], object]) -> int:
  """Appends the rows of each batch, (paths, reasons, outputs), to the CSV
  (header first if new), flushed per batch, then calls `on_batch(number of
  rows)`; returns the number of unreadable images."""
  new_file = not os.path.exists(output_csv) or not os.path.getsize(output_csv)
  num_errors = 0
  with label_report.open_csv(output_csv, 'a') as f:
    writer = csv.writer(f)
    if new_file:
      writer.writerow(header)
      f.flush()
    for paths, reasons, outputs in batches:
      writer.writerows(format_rows(paths, reasons, outputs, header))
      f.flush()
      num_errors += sum(bool(r) for r in reasons)
      on_batch(len(paths))
  return num_errors


# ----------------------------------------------------------------- sidecar --


def run_arguments(workdir, images_dir, config, settings: dict, header,
                  framing) -> dict:
  """The arguments that change the CSV's numbers (stored in the sidecar):
  the Predictor's `settings()`, the model, the columns and the framing."""
  recorded = dict(settings, resize=framing.resize)
  if framing.boxes:
    recorded.update(boxes=framing.boxes, box_margin=framing.box_margin)
  args = {
      'workdir': os.path.abspath(workdir),
      'images_dir': os.path.abspath(images_dir),
      'model': config.model,
      'image_size': list(config.image_size),
      'columns': list(header),
  }
  args.update((k, v) for k, v in recorded.items()
              if k not in _OMITTED_DEFAULTS or v != _OMITTED_DEFAULTS[k])
  return args


def check_args(args_path: str, args: dict, output_csv: str) -> None:
  """Writes the arguments sidecar, or checks an existing one matches."""
  csv_exists = os.path.exists(output_csv) and os.path.getsize(output_csv) > 0
  if not csv_exists:
    fileio.write_json(args_path, args, sort_keys=True)
    return
  if not os.path.exists(args_path):
    raise ResumeError(
        f'{output_csv} exists but {args_path} (the arguments it was made with) '
        'does not, so it cannot be resumed safely. Delete it or choose another '
        '--output.')
  try:
    with open(args_path) as f:
      old = json.load(f)
  except ValueError as e:
    raise ResumeError(
        f'{args_path} is not readable JSON ({e}); it records the arguments '
        'of the labels CSV beside it. Delete both or choose another '
        '--output.') from e
  diff = {k: (old.get(k), args.get(k)) for k in set(old) | set(args)
          if old.get(k) != args.get(k)}
  if diff:
    lines = '\n'.join(f'  {k}: was {a!r}, now {b!r}'
                      for k, (a, b) in sorted(diff.items()))
    raise ResumeError(
        f'{output_csv} was made with other arguments; resuming would mix '
        f'results:\n{lines}\nRerun with the old arguments, or delete '
        f'{output_csv} and {args_path}, or choose another --output.')


# ---------------------------------------------------------------- resuming --


def drop_partial_last_record(path: str, num_columns: int) -> None:
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


def data_rows(output_csv: str, header: Sequence[str]) -> Iterator[list]:
  """The rows after the header of `output_csv` (checked to be `header`)."""
  with label_report.open_csv(output_csv) as f:
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
      return
    if tuple(first) != tuple(header):
      raise ResumeError(
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
    for row in data_rows(output_csv, header):
      if _unwanted(row, seen, header, excluded) is None:
        seen.add(row[0])
        writer.writerow(row)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, output_csv)


def done_paths(output_csv: str, header: Sequence[str], excluded: Set[str],
               tmp: str) -> Tuple[Set[str], int]:
  """(paths already labelled in `output_csv`, rows dropped to repair it).

  Repairs: a killed run's partial last row is dropped; repeated rows of a
  path (two runs at once of an older version), repeated headers and rows of
  `excluded` paths (the labeller's own outputs) are removed, keeping each
  path's first row, and how many is logged.
  """
  if not os.path.exists(output_csv):
    return set(), 0
  drop_partial_last_record(output_csv, len(header))
  seen, dropped = set(), collections.Counter()
  for row in data_rows(output_csv, header):
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
