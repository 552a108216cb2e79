"""Tests for gender_jax.label_report on hand-written labels CSVs (no model)."""

import csv
import math
import os

import numpy as np
import pytest

from gender_jax import label_report

HEADER = ['path', 'p_male', 'predicted', 'mc_mean', 'mc_std', 'mc_entropy',
          'mc_mutual_info', 'error']
LATIN1 = os.fsdecode(b'B/latin1_\xe9\xff.jpg')


def write_labels(path, rows):
  """A labels CSV; rows are (path, p_male, mc_mean, mutual_info, error)."""
  with label_report.open_csv(str(path), 'w') as f:
    writer = csv.writer(f)
    writer.writerow(HEADER)
    for name, p, mean, bald, error in rows:
      if error:
        writer.writerow([name, '', '', '', '', '', '', error])
      else:
        writer.writerow([name, p, 'male' if p >= 0.5 else 'female', mean,
                         0.1, 0.5, bald, ''])


ROWS = [
    ('A/1.jpg', 0.9, 0.8, 0.01, ''),
    ('A/2.jpg', 0.8, 0.7, 0.02, ''),
    ('A/3.jpg', 0.2, 0.3, 0.05, ''),      # Disagrees with A's majority.
    ('A/4.jpg', None, None, None, 'OSError: broken'),
    ('B/5.jpg', 0.1, 0.2, 0.03, ''),
    (LATIN1, 0.7, 0.8, 0.04, ''),         # Disagrees with B's majority.
    ('B/7.jpg', 0.3, 0.2, 0.01, ''),
]


def read(path):
  with label_report.open_csv(str(path)) as f:
    return list(csv.DictReader(f))


def test_read_results_streams_numbers_and_errors(tmp_path):
  out = tmp_path / 'l.csv'
  write_labels(out, ROWS)
  paths, ok, values = label_report.read_results(str(out))
  assert paths == [r[0] for r in ROWS]
  assert ok.tolist() == [True, True, True, False, True, True, True]
  assert set(values) == {'p_male', 'mc_mean', 'mc_std', 'mc_entropy',
                         'mc_mutual_info'}
  assert values['p_male'][0] == 0.9 and math.isnan(values['p_male'][3])


def test_per_directory_and_flagged_with_a_non_utf8_name(tmp_path):
  out = tmp_path / 'l.csv'
  write_labels(out, ROWS)
  summary = label_report.summarize(str(out), per_directory=True)
  assert summary['num_rows'] == 7 and summary['num_errors'] == 1
  assert summary['num_male'] == 3 and summary['num_female'] == 3
  assert 'num_with_given_label' not in summary    # A/, B/ give no labels.
  dirs = {r['directory']: r for r in read(summary['per_directory_csv'])}
  assert dirs['A']['majority'] == 'male' and dirs['B']['majority'] == 'female'
  assert dirs['A']['images'] == '4' and dirs['A']['errors'] == '1'
  assert float(dirs['A']['agreement']) == pytest.approx(2 / 3, abs=1e-6)
  assert float(dirs['B']['mean_p_male']) == pytest.approx(1.1 / 3, abs=1e-6)
  flagged = read(summary['flagged_csv'])
  assert [r['path'] for r in flagged] == ['A/3.jpg', LATIN1]
  # The non-UTF-8 name is written back as its original bytes.
  with open(summary['flagged_csv'], 'rb') as f:
    assert b'\nB/latin1_\xe9\xff.jpg,' in f.read()


def test_mislabel_ranking_from_a_labels_file(tmp_path):
  out = tmp_path / 'l.csv'
  write_labels(out, ROWS)
  given = tmp_path / 'given.csv'
  with label_report.open_csv(str(given), 'w') as f:
    f.write('path,label\nA,male\nB,female\n' + LATIN1 + ',m\n')
  summary = label_report.summarize(str(out), labels=str(given))
  ranked = read(summary['mislabels_csv'])
  # Score 1 - p(given) with p the MC mean: A/3 0.7, A/2 0.3, then two exact
  # ties, each led by the higher mutual information: B/5 and B/7 (p 0.2),
  # latin1 and A/1 (1 - 0.8, a hair under 0.2).
  assert [r['path'] for r in ranked] == [
      'A/3.jpg', 'A/2.jpg', 'B/5.jpg', 'B/7.jpg', LATIN1, 'A/1.jpg']
  assert [float(r['score']) for r in ranked] == pytest.approx(
      [0.7, 0.3, 0.2, 0.2, 0.2, 0.2])
  assert ranked[0]['given'] == 'male' and ranked[0]['predicted'] == 'female'
  assert summary['num_with_given_label'] == 7
  assert summary['num_disagree_given'] == 1       # A/3 (latin1 is given m).
  assert 'mislabels_png' not in summary            # No images folder.


def test_review_lists_the_least_confident_first(tmp_path):
  out = tmp_path / 'l.csv'
  write_labels(out, ROWS)
  summary = label_report.summarize(str(out), review_below=0.85)
  # Confidence max(p, 1 - p): 0.7 (LATIN1, B/7), then 0.8 (A/2, A/3); ties
  # in CSV order; the unreadable A/4 and the 0.9s are not listed.
  review = read(summary['review_csv'])
  assert summary['num_to_review'] == 4
  assert [r['path'] for r in review] == [LATIN1, 'B/7.jpg', 'A/2.jpg',
                                         'A/3.jpg']
  assert [r['rank'] for r in review] == ['1', '2', '3', '4']
  assert [float(r['confidence']) for r in review] == pytest.approx(
      [0.7, 0.7, 0.8, 0.8])
  assert review[0]['predicted'] == 'male' and review[0]['mc_std'] == '0.1'
  assert summary['review_csv'] == str(tmp_path / 'l_review.csv')
  assert 'review_csv' not in label_report.summarize(str(out))


def test_mislabel_order_breaks_ties_by_mutual_information():
  p = np.asarray([0.9, 0.1, 0.9, 0.6])
  given = np.asarray([0, 1, 0, -1])
  order, scores = label_report.mislabel_order(
      p, given, np.ones(4, bool), np.asarray([0.1, 0.3, 0.2, 0.9]))
  assert order.tolist() == [1, 2, 0] and scores.tolist() == [0.9, 0.9, 0.9]


def test_labels_file_errors_name_the_line(tmp_path):
  bad = tmp_path / 'given.csv'
  bad.write_text('path,label\nA,male\nB,maybe\n')
  with pytest.raises(ValueError, match='line 3'):
    label_report.read_labels(str(bad))
  bad.write_text('name,label\nA,male\n')
  with pytest.raises(ValueError, match='needs a path column'):
    label_report.read_labels(str(bad))


def test_display_path_shows_the_bytes():
  assert label_report.display_path(LATIN1) == 'B/latin1_\\xe9\\xff.jpg'
  assert label_report.display_path('Été/a.jpg') == 'Été/a.jpg'
