"""Which score flags a labeller's mistakes best: confidence or MC-Dropout.

A labeller that flags the faces it doubts should flag its errors first. Given
`scripts/label.py --mc_samples=N` CSVs (N > 1) of faces with known labels,
this prints the accuracy on the most confident 100 / 95 / 90 / 85 / 80% of
the faces when they are ranked by each score the CSV offers: the confidence
max(p, 1-p) of p(male) and of the MC-Dropout mean, and a low MC standard
deviation or mutual information (`evaluate`'s `selective_accuracy`; a low
predictive entropy ranks as the MC mean's confidence: it is the entropy of
that mean). True labels come from Male/Female folders in the paths, or with
--utkface=DIR from UTKFace's file names, keeping the faces of
`prepare_data.py`'s content-hash test part only.

  python scripts/label.py --workdir=W --images=../shared/data/utkface \\
      --output=W.csv --mc_samples=20
  python benchmarks/flagging.py --utkface=../shared/data/utkface W.csv
"""

import argparse
import os

import numpy as np

import utkface_groups  # pylint: disable=g-bad-import-order
from gender_jax import evaluate
from gender_jax import label_report
from gender_jax import sources

COVERAGES = (1.0, 0.95, 0.9, 0.85, 0.8)
# name: (column whose p >= 0.5 is the prediction, score column, sign).
RANKINGS = {
    'confidence of p(male)': ('p_male', None, 1),
    'confidence of the MC mean': ('mc_mean', None, 1),
    'low MC standard deviation': ('p_male', 'mc_std', -1),
    'low mutual information': ('p_male', 'mc_mutual_info', -1),
}


def true_labels(paths, utkface_dir, parser):
  """(row indices, labels) of the rows with a known true label."""
  if utkface_dir:
    faces = utkface_groups.test_faces(utkface_dir,
                                      sources.DEFAULT_VAL_FRACTION,
                                      sources.DEFAULT_TEST_FRACTION)
    known = [(i, faces[os.path.basename(p)][0]) for i, p in enumerate(paths)
             if os.path.basename(p) in faces]
  else:
    known = [(i, label_report.folder_label(p)) for i, p in enumerate(paths)]
    known = [(i, y) for i, y in known if y is not None]
  if not known:
    parser.error('no row has a known label: give --utkface=DIR or label '
                 'images under Male/ and Female/ folders')
  rows, labels = zip(*known)
  return np.array(rows), np.array(labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('csvs', nargs='+')
  parser.add_argument('--utkface', help='UTKFace folder: labels from names, '
                      'test part only')
  args = parser.parse_args()
  for path in args.csvs:
    paths, ok, values = label_report.read_results(path)
    if 'mc_std' not in values:
      parser.error(f'{path} has no MC-Dropout columns: label with '
                   '--mc_samples=20')
    rows, labels = true_labels(paths, args.utkface, parser)
    if not ok[rows].all():
      parser.error(f'{path}: {int((~ok[rows]).sum())} labelled faces could '
                   'not be read')
    print(f'\n{path}: {len(rows)} faces; accuracy % on the most confident')
    print('| ranked by | ' + ' | '.join(f'{c:.0%}' for c in COVERAGES) + ' |')
    print('| --- ' * (1 + len(COVERAGES)) + '|')
    for name, (prediction, score, sign) in RANKINGS.items():
      kept = evaluate.selective_accuracy(
          labels, values[prediction][rows], COVERAGES,
          score=None if score is None else sign * values[score][rows])
      print(f'| {name} | '
            + ' | '.join(f"{100 * k['accuracy']:.1f}" for k in kept) + ' |')


if __name__ == '__main__':
  main()
