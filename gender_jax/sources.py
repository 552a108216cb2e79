"""Labelled face sources: the files of one collection, their labels and splits.

`read_source(kind, path)` lists a collection as `Item`s (file, label, split)
plus the files it skipped and why. Kinds (`KINDS`):

* `folders`: `{Train,Validation[,Test]}/{Male,Female}/*` (aliases in
  `gender_jax.labels`), the original project's raw layout;
* `utkface`: UTKFace's flat folder, the label in each file name
  `age_gender_race_datetime.jpg.chip.jpg` (gender 0 = male, 1 = female);
* `celeba`: CelebA's release: `img_align_celeba/`, `list_attr_celeba.txt`
  (`Male` column, 1 / -1) and `list_eval_partition.txt` (0/1/2 = train/
  validation/test), at the top or under `Img/`, `Anno/`, `Eval/`;
* `csv`: a CSV of `path,label[,split]` (label male|female|1|0; split
  train|validation|test or empty; paths relative to the CSV), or with a
  header row naming those columns among others (FairFace's `file,...,
  gender,...` label files as they are, split by content hash).

A source without splits of its own (UTKFace, a CSV's rows with an empty
split) is split by `hash_split` of each file's bytes, so the split is the
same on every machine and run, and identical files always land together.
Nothing here decodes images or imports TensorFlow.
"""

import concurrent.futures
import csv
import dataclasses
import hashlib
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from gender_jax import errors
from gender_jax import labels

KINDS = ('folders', 'utkface', 'celeba', 'csv')
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
EXPECTED_LAYOUT = """Expected layout (names case-insensitive):
  RAW_DIR/Train|Training/Female|Woman/<images>  and  .../Male|Man/<images>
  RAW_DIR/Validation|Valid|Val/Female|Woman/...  and  .../Male|Man/...
  RAW_DIR/Test|Testing/Female|Woman/...  and  .../Male|Man/...   (optional)"""
REQUIRED_SPLITS = ('train', 'validation')
UTKFACE_NAME = re.compile(
    r'^(?P<age>\d{1,3})_(?P<gender>\d)_(?P<race>[0-4])_(?P<date>\d{8,})'
    r'\.jpg\.chip\.jpg$')
_SOURCE_NAME = re.compile(r'^[a-z][a-z0-9]*$')

log = logging.getLogger(__name__)


class LayoutError(errors.UserError, ValueError):
  """An input folder or file this module cannot make a dataset from; the
  message names it and says what to do (scripts: one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One labelled image file: `split` None means 'split by content hash'."""
  path: str
  label: int
  split: Optional[str] = None


@dataclasses.dataclass
class Source:
  """A collection's items and skipped (path, reason) pairs."""
  name: str
  kind: str
  path: str
  items: List[Item]
  skipped: List[Tuple[str, str]]


# ------------------------------------------------------------------ specs --


def parse_spec(spec: str) -> Tuple[Optional[str], str, str]:
  """'[NAME=]KIND:PATH' -> (name or None, kind, path); LayoutError if bad."""
  name = None
  head, sep, path = spec.partition(':')
  if '=' in head:
    name, _, head = head.partition('=')
  if not sep or not path or head not in KINDS:
    raise LayoutError(
        f'--source={spec!r}: expected [NAME=]KIND:PATH with KIND one of '
        f'{"|".join(KINDS)}, e.g. --source=utkface:/data/UTKFace.')
  if name is not None and not _SOURCE_NAME.match(name):
    raise LayoutError(f'--source={spec!r}: the name {name!r} must be lower-'
                      'case letters and digits, starting with a letter.')
  return name, head, path


def source_names(specs: Sequence[Tuple[Optional[str], str, str]]) -> List[str]:
  """Each spec's name: its own, else its kind (kind2, kind3 ... if repeated)."""
  names = []
  for name, kind, _ in specs:
    if name is None:
      name, n = kind, 1
      while name in names or any(s[0] == name for s in specs):
        n += 1
        name = f'{kind}{n}'
    if name in names:
      raise LayoutError(f'two --source flags are named {name!r}; give each '
                        'its own NAME= prefix.')
    names.append(name)
  return names


# ------------------------------------------------------------ hash splits --


def file_digest(path: str) -> str:
  """SHA-256 (hex) of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def hash_split(digest: str, val_fraction: float, test_fraction: float) -> str:
  """'train', 'validation' or 'test' of a file by its content digest.

  The first 64 bits of the digest as a number u in [0, 1): test when
  u < test_fraction, validation when u < test_fraction + val_fraction.
  """
  u = int(digest[:16], 16) / float(1 << 64)
  if u < test_fraction:
    return 'test'
  if u < test_fraction + val_fraction:
    return 'validation'
  return 'train'


def assign_splits(source: Source, val_fraction: float, test_fraction: float,
                  num_workers: int = 8) -> Source:
  """`source` with every split-less item given its `hash_split`; files that
  cannot be read are moved to `skipped` with the reason."""
  if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or (
      val_fraction + test_fraction >= 1):
    raise LayoutError(
        f'--val_fraction={val_fraction} --test_fraction={test_fraction}: each '
        'must be in [0, 1) and their sum below 1.')
  todo = [i for i, item in enumerate(source.items) if item.split is None]
  if not todo:
    return source

  def digest(i):
    try:
      return file_digest(source.items[i].path), ''
    except OSError as e:
      return None, f'{type(e).__name__}: {e.strerror or e}'

  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    digests = dict(zip(todo, pool.map(digest, todo)))
  items, skipped = [], list(source.skipped)
  for i, item in enumerate(source.items):
    if i in digests:
      value, reason = digests[i]
      if value is None:
        skipped.append((item.path, reason))
        continue
      item = dataclasses.replace(
          item, split=hash_split(value, val_fraction, test_fraction))
    items.append(item)
  return dataclasses.replace(source, items=items, skipped=skipped)


# ---------------------------------------------------------------- folders --


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
    canonical = labels.match_alias(entry.name, aliases)
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
  splits = _alias_dirs(raw_dir, labels.SPLIT_ALIASES, 'split')
  missing = [s for s in REQUIRED_SPLITS if s not in splits]
  if missing:
    raise LayoutError(
        f'{raw_dir}: no {" or ".join(missing)} folder found (has: '
        f'{sorted(os.listdir(raw_dir))}).\n{EXPECTED_LAYOUT}')
  files = {}
  for split in labels.SPLIT_ALIASES:
    if split not in splits:
      continue
    split_dir = os.path.join(raw_dir, splits[split])
    classes = _alias_dirs(split_dir, labels.CLASS_ALIASES, 'class')
    files[split] = {}
    for cls in labels.CLASS_NAMES:
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


def _read_folders(path: str):
  files = find_raw_files(path)
  items = [Item(p, label, split) for split, by_class in files.items()
           for label, cls in enumerate(labels.CLASS_NAMES)
           for p in by_class[cls]]
  return items, []


# ---------------------------------------------------------------- utkface --


def utkface_item(path: str) -> Item:
  """The Item of a UTKFace file name; ValueError saying why it is not one."""
  name = os.path.basename(path)
  match = UTKFACE_NAME.match(name)
  if not match:
    raise ValueError('not a UTKFace name age_gender_race_datetime.jpg.chip.'
                     'jpg')
  return Item(path, labels.utkface_label(match['gender']))


def _read_utkface(path: str):
  if not os.path.isdir(path):
    raise LayoutError(f'{path} is not a folder: --source=utkface:PATH takes '
                      "UTKFace's flat folder of *.jpg.chip.jpg files.")
  items, skipped = [], []
  for entry in _entries(path):
    if entry.name.startswith('.') or _is_dir(entry):
      continue
    try:
      items.append(utkface_item(entry.path))
    except ValueError as e:
      skipped.append((entry.path, str(e)))
  return items, skipped


# ----------------------------------------------------------------- celeba --


def _find_file(root: str, name: str, subdirs: Sequence[str]) -> str:
  subdirs = ('',) + tuple(subdirs)
  for sub in subdirs:
    candidate = os.path.join(root, sub, name)
    if os.path.exists(candidate):
      return candidate
  raise LayoutError(
      f'{root}: no {name} (looked in {", ".join(s or "." for s in subdirs)}); '
      "--source=celeba:PATH takes CelebA's release folder with "
      'img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt.')


def _read_lines(path: str) -> List[str]:
  """A text file's lines (endings kept, a UTF-8 BOM dropped, undecodable
  bytes kept as in file names); LayoutError if it cannot be read."""
  try:
    with open(path, newline='', encoding='utf-8-sig',
              errors='surrogateescape') as f:
      return f.readlines()
  except OSError as e:
    raise LayoutError(f'cannot read {path}: {e.strerror or e}.') from e


def _whitespace_table(path: str) -> List[Tuple[int, List[str]]]:
  return [(n, line.split()) for n, line in enumerate(_read_lines(path), 1)
          if line.strip()]


def _read_celeba(path: str):
  if not os.path.isdir(path):
    raise LayoutError(f'{path} is not a folder: --source=celeba:PATH takes '
                      "CelebA's release folder.")
  images = _find_file(path, 'img_align_celeba', ('Img',))
  attrs = _find_file(path, 'list_attr_celeba.txt', ('Anno',))
  partition = _find_file(path, 'list_eval_partition.txt', ('Eval', 'Anno'))
  rows = _whitespace_table(attrs)
  # Line 1: the image count; line 2: the attribute names; then one row each.
  header = rows[1][1] if len(rows) > 1 else []
  if 'Male' not in header:
    raise LayoutError(f'{attrs}: no Male column in its header line 2.')
  male_col = header.index('Male') + 1        # Rows start with the file name.
  splits, skipped = {}, []
  for n, fields in _whitespace_table(partition):
    if len(fields) != 2 or fields[1] not in labels.CELEBA_PARTITIONS:
      raise LayoutError(f'{partition}, line {n}: expected "<file> 0|1|2".')
    splits[fields[0]] = labels.CELEBA_PARTITIONS[fields[1]]
  items = []
  for n, fields in rows[2:]:
    file = os.path.join(images, fields[0])
    try:
      if len(fields) != len(header) + 1:
        raise ValueError(f'{len(fields) - 1} attributes, the header names '
                         f'{len(header)}')
      label = labels.celeba_label(fields[male_col])
      if fields[0] not in splits:
        raise ValueError(f'not in {os.path.basename(partition)}')
    except ValueError as e:
      skipped.append((file, f'{os.path.basename(attrs)} line {n}: {e}'))
      continue
    items.append(Item(file, label, splits[fields[0]]))
  return items, skipped


# -------------------------------------------------------------------- csv --


def _csv_header(row: Sequence[str], path: str):
  """{'path', 'label', 'split'} column indices if `row` is a header, else
  None. A header names a label column and its second cell is no label value
  (so a data row `sex,male` stays data). The path is the named image column,
  else the first; in the old `path,label,split` shape the third column is
  the split whatever its name."""
  columns = labels.csv_columns(row)
  if columns['label'] is None or (
      len(row) > 1 and row[1].strip().lower() in labels.LABEL_VALUES):
    return None
  if columns['path'] is None:
    if columns['folder'] is not None or columns['label'] == 0:
      raise LayoutError(f'{path}: header {row} names no image path column '
                        f"(one of {labels.CSV_COLUMNS['path']}).")
    columns['path'] = 0
  if columns['split'] is None and len(row) == 3 and columns['label'] == 1 and (
      columns['path'] == 0):
    columns['split'] = 2
  return columns


def _read_csv(path: str):
  """Items of a CSV of path,label[,split] rows, or with a header row (see
  `_csv_header`; FairFace's label files work as they are: other columns are
  ignored)."""
  if not os.path.isfile(path):
    raise LayoutError(f'{path} is not a file: --source=csv:PATH takes a CSV '
                      'of path,label[,split] rows.')
  root = os.path.dirname(os.path.abspath(path))
  items, skipped = [], []
  columns, header, first = {'path': 0, 'label': 1, 'split': 2}, None, True
  for n, row in enumerate(csv.reader(_read_lines(path)), 1):
    if not row or not ''.join(row).strip():
      continue
    if first:
      first, named = False, _csv_header(row, path)
      if named is not None:
        columns, header = named, row
        continue
    given, label, split = (
        row[columns[k]].strip() if columns[k] is not None and
        columns[k] < len(row) else '' for k in ('path', 'label', 'split'))
    file = os.path.join(root, given) if given else path
    try:
      if header is None and (len(row) not in (2, 3) or not given):
        raise ValueError('expected path,label[,split]')
      for key, text in (('path', given), ('label', label)):
        if header is not None and not text:
          raise ValueError(f'no {header[columns[key]].strip()!r} value')
      label = labels.parse_label(label)
      canonical = labels.match_alias(split, labels.SPLIT_ALIASES)
      if split and canonical is None:
        raise ValueError(f'split {split!r}: expected train|validation|test '
                         'or empty')
    except ValueError as e:
      skipped.append((file, f'{os.path.basename(path)} line {n}: {e}'))
      continue
    items.append(Item(file, label, canonical))
  return items, skipped


_READERS = {'folders': _read_folders, 'utkface': _read_utkface,
            'celeba': _read_celeba, 'csv': _read_csv}


def read_source(kind: str, path: str, name: Optional[str] = None,
                val_fraction: float = DEFAULT_VAL_FRACTION,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> Source:
  """Reads one source; items without a split of their own get `hash_split`.

  Raises LayoutError when the source cannot be read at all, or has no
  usable image, or lacks a train or validation part.
  """
  if kind not in _READERS:
    raise LayoutError(f'source kind {kind!r}: expected one of {KINDS}.')
  items, skipped = _READERS[kind](path)
  source = assign_splits(Source(name or kind, kind, path, items, skipped),
                         val_fraction, test_fraction)
  if not source.items:
    raise LayoutError(f'{kind} source {path}: no usable image '
                      f'({len(source.skipped)} skipped).')
  for split in REQUIRED_SPLITS:
    if not any(item.split == split for item in source.items):
      raise LayoutError(f'{kind} source {path}: no {split} images; raise '
                        '--val_fraction or add a split to its files.')
  return source


def counts(items: Sequence[Item]) -> Dict[str, Dict[str, int]]:
  """{split: {class name: n}} of `items`, splits in `labels.SPLITS` order."""
  out = {}
  for split in labels.SPLITS:
    chosen = [i for i in items if i.split == split]
    if chosen:
      out[split] = {cls: sum(i.label == c for i in chosen)
                    for c, cls in enumerate(labels.CLASS_NAMES)}
  return out


def parse_weights(text: str) -> Dict[str, float]:
  """'utkface:2,folders:1' -> {'utkface': 2.0, 'folders': 1.0}; '' -> {}.

  ValueError for a malformed entry, a negative weight or all weights 0.
  """
  weights = {}
  for entry in filter(None, (e.strip() for e in (text or '').split(','))):
    name, sep, value = entry.partition(':')
    try:
      weight = float(value)
    except ValueError:
      weight = None
    if not sep or not _SOURCE_NAME.match(name.strip()) or weight is None or (
        weight < 0) or name.strip() in weights:
      raise ValueError(f'source weight {entry!r}: expected NAME:WEIGHT with '
                       'a source name and a number >= 0, each source once')
    weights[name.strip()] = weight
  if weights and not sum(weights.values()):
    raise ValueError('source weights are all 0')
  return weights

