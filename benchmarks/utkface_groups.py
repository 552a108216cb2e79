"""Accuracy by age band and ethnic group on UTKFace's test part.

UTKFace's file names carry each face's age, gender and ethnic group. Given
`scripts/label.py` CSVs of the whole UTKFace folder (one per model), this
keeps the files that `prepare_data.py`'s content-hash split puts in the test
part (never trained on) and prints, side by side per CSV, the accuracy and
female recall of each age band and group: where a model still fails on faces
unlike CelebA's.

  python scripts/label.py --workdir=W --images=../shared/data/utkface \\
      --output=W.csv
  python benchmarks/utkface_groups.py --images=../shared/data/utkface \\
      W1.csv W2.csv
"""

import argparse
import collections
import os

from gender_jax import label_report
from gender_jax import labels
from gender_jax import sources

AGE_BANDS = ((0, 2), (3, 12), (13, 19), (20, 39), (40, 59), (60, 79),
             (80, 200))
GROUPS = ('White', 'Black', 'Asian', 'Indian', 'Others')


def test_faces(images: str, val_fraction: float, test_fraction: float):
  """{file name: (label, age, group)} of the test part, read and split as
  `prepare_data.py --source=utkface:` does (`sources.read_source`)."""
  source = sources.read_source('utkface', images, val_fraction=val_fraction,
                               test_fraction=test_fraction)
  faces = {}
  for item in source.items:
    if item.split == 'test':
      name = os.path.basename(item.path)
      match = sources.UTKFACE_NAME.match(name)
      faces[name] = (item.label, int(match['age']),
                     GROUPS[int(match['race'])])
  return faces


def predictions(csv_path: str):
  """{file name: predicted label} of a label.py CSV (readable rows), read as
  `label_report` reads it: male when p(male) >= 0.5."""
  paths, ok, values = label_report.read_results(csv_path)
  return {os.path.basename(path): int(p >= 0.5)
          for path, good, p in zip(paths, ok, values['p_male']) if good}


def group_scores(faces, predicted):
  """{group name: (n, accuracy, female recall)} for age bands, groups,
  teenagers and adults ('age 13+') and all."""
  members = collections.defaultdict(list)
  for name, (label, age, group) in faces.items():
    band = next(f'age {lo}-{hi}' if hi < 200 else f'age {lo}+'
                for lo, hi in AGE_BANDS if lo <= age <= hi)
    keys = (band, group, 'all') + (('age 13+',) if age >= 13 else ())
    for key in keys:
      members[key].append((label, predicted[name]))
  scores = {}
  for key, pairs in members.items():
    female = [p for y, p in pairs if y == labels.CLASS_NAMES.index('female')]
    scores[key] = (len(pairs), sum(y == p for y, p in pairs) / len(pairs),
                   female.count(0) / len(female) if female else float('nan'))
  return scores


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('csvs', nargs='+')
  parser.add_argument('--images', required=True)
  parser.add_argument('--val_fraction', type=float,
                      default=sources.DEFAULT_VAL_FRACTION)
  parser.add_argument('--test_fraction', type=float,
                      default=sources.DEFAULT_TEST_FRACTION)
  args = parser.parse_args()
  faces = test_faces(args.images, args.val_fraction, args.test_fraction)
  tables = []
  for path in args.csvs:
    predicted = predictions(path)
    missing = sorted(set(faces) - set(predicted))
    if missing:
      parser.error(f'{path} has no prediction for {len(missing)} test faces, '
                   f'e.g. {missing[0]}')
    tables.append(group_scores(faces, predicted))
  keys = ([f'age {lo}-{hi}' if hi < 200 else f'age {lo}+'
           for lo, hi in AGE_BANDS] + list(GROUPS) + ['age 13+', 'all'])
  print('accuracy % / female recall % on the UTKFace test part')
  print('| group | faces | ' + ' | '.join(args.csvs) + ' |')
  print('| --- ' * (2 + len(args.csvs)) + '|')
  for key in keys:
    if key not in tables[0]:
      continue
    cells = [f'{100 * t[key][1]:.1f} / {100 * t[key][2]:.1f}' for t in tables]
    print(f'| {key} | {tables[0][key][0]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
