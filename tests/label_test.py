"""Tests for gender_jax.label: the resumable folder labeller."""

import contextlib
import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gender_jax import image_io
from gender_jax import label
from gender_jax import label_csv
from gender_jax import label_report
from gender_jax import locking
from gender_jax import synthetic

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_workdir):
  return make_workdir(tmp_path_factory.mktemp('w'))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """Synthetic Female/Male folders (mixed formats/sizes) + 3 broken files."""
  root = tmp_path_factory.mktemp('images')
  synthetic.make_raw_dataset(str(root), counts={'Test': (14, 15)}, seed=5)
  broken = synthetic.add_broken_files(str(root / 'Test' / 'Female'))
  return str(root / 'Test'), broken


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def run(workdir, images_dir, out, **kwargs):
  kwargs.setdefault('batch_size', 8)
  return label.label_images(workdir, images_dir, str(out), progress=False,
                            **kwargs)


@contextlib.contextmanager
def held_elsewhere(lock_path):
  """Lock file `lock_path` held by another live process (yields its pid)."""
  holder = subprocess.Popen([sys.executable, '-c',
                             'import time; time.sleep(600)'])
  try:
    lock_path.write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': holder.pid, 'started': 0}))
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()


def test_list_images_sorted_recursive_and_filtered(tmp_path):
  for rel in ('b/2.JPG', 'b/1.png', 'a/c/3.jpeg', 'a/4.webp', 'x.txt',
              '.hidden/5.jpg', 'a/.6.jpg', 'top.bmp'):
    os.makedirs(os.path.dirname(str(tmp_path / rel)) or str(tmp_path),
                exist_ok=True)
    (tmp_path / rel).write_bytes(b'')
  assert image_io.list_images(str(tmp_path)) == [
      'top.bmp', 'a/4.webp', 'a/c/3.jpeg', 'b/1.png', 'b/2.JPG']


def test_one_row_per_file_errors_have_reasons(workdir, images, tmp_path):
  images_dir, broken = images
  summary = run(workdir, images_dir, tmp_path / 'l.csv')
  rows = read_csv(tmp_path / 'l.csv')
  files = image_io.list_images(images_dir)
  assert [r['path'] for r in rows] == files
  assert summary['num_rows'] == len(files) == 14 + 15 + 3
  assert summary['num_errors'] == summary['num_errors_now'] == 3
  bad = {r['path']: r['error'] for r in rows if r['error']}
  assert set(bad) == {os.path.relpath(p, images_dir) for p in broken}
  assert all(reason and r == '' for reason, r in
             ((bad[p], next(x['p_male'] for x in rows if x['path'] == p))
              for p in bad))
  good = [r for r in rows if not r['error']]
  p = np.asarray([float(r['p_male']) for r in good])
  assert ((p >= 0.5) == [r['predicted'] == 'male' for r in good]).all()
  truth = np.asarray([r['path'].startswith('Male/') for r in good])
  assert ((p >= 0.5) == truth).mean() >= 0.9
  assert list(rows[0]) == ['path', 'p_male', 'predicted', 'error']
  assert summary['images_per_second'] > 0


def test_matches_predictor_on_decoded_images(workdir, images, tmp_path):
  images_dir, _ = images
  run(workdir, images_dir, tmp_path / 'l.csv')
  rows = [r for r in read_csv(tmp_path / 'l.csv') if not r['error']][:6]
  from gender_jax import predict  # pylint: disable=g-import-not-at-top
  batch = np.stack([image_io.load_image(os.path.join(images_dir, r['path']),
                                        (24, 20)) for r in rows])
  want = predict.Predictor.from_workdir(workdir, batch_size=8).predict(batch)
  np.testing.assert_allclose([float(r['p_male']) for r in rows],
                             want['p_male'], rtol=1e-5)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(workdir, images, tmp_path):
  images_dir, _ = images
  full = tmp_path / 'full.csv'
  run(workdir, images_dir, full, mc_samples=5)
  text = full.read_text()
  # A run killed mid-write: keeps 13 rows and half of the 14th.
  lines = text.splitlines(keepends=True)
  part = tmp_path / 'part.csv'
  part.write_text(''.join(lines[:14]) + lines[14][:9])
  os.link(str(full) + '.args.json', str(part) + '.args.json')
  summary = run(workdir, images_dir, part, mc_samples=5)
  assert summary['num_resumed'] == 13
  assert part.read_text() == text
  # Killed right after the header: no second header.
  part.write_text(lines[0])
  run(workdir, images_dir, part, mc_samples=5)
  assert part.read_text() == text
  # Rerunning a finished output adds nothing.
  assert run(workdir, images_dir, part, mc_samples=5)['num_labelled_now'] == 0
  assert part.read_text() == text


def test_resume_refuses_other_arguments(workdir, images, tmp_path):
  images_dir, _ = images
  out = tmp_path / 'l.csv'
  run(workdir, images_dir, out)
  with pytest.raises(ValueError, match='mc_samples'):
    run(workdir, images_dir, out, mc_samples=3)
  os.remove(str(out) + '.args.json')
  with pytest.raises(ValueError, match='cannot be resumed'):
    run(workdir, images_dir, out)


def test_mc_columns_zero_and_positive_dropout(images, tmp_path, make_workdir):
  images_dir, _ = images
  for dropout in (0.0, 0.3):
    w = make_workdir(tmp_path / f'w{dropout}', dropout=dropout)
    out = tmp_path / f'mc{dropout}.csv'
    run(w, images_dir, out, mc_samples=10)
    rows = [r for r in read_csv(out) if not r['error']]
    std = np.asarray([float(r['mc_std']) for r in rows])
    bald = np.asarray([float(r['mc_mutual_info']) for r in rows])
    ent = np.asarray([float(r['mc_entropy']) for r in rows])
    assert (ent >= bald - 1e-6).all()
    if dropout == 0:
      assert np.abs(std).max() < 1e-6 and np.abs(bald).max() < 1e-6
    else:
      assert (std > 0).mean() > 0.9 and (bald > 0).mean() > 0.9


def test_per_directory_summary_and_flags(workdir, images, tmp_path):
  images_dir, _ = images
  out = tmp_path / 'l.csv'
  summary = run(workdir, images_dir, out, per_directory=True)
  dirs = {r['directory']: r for r in read_csv(summary['per_directory_csv'])}
  assert set(dirs) == {'Female', 'Male'}
  assert dirs['Female']['majority'] == 'female'
  assert dirs['Male']['majority'] == 'male'
  rows = read_csv(out)
  for name, d in dirs.items():
    mine = [r for r in rows if r['path'].startswith(name + '/')]
    ok = [r for r in mine if not r['error']]
    agree = sum(r['predicted'] == d['majority'] for r in ok)
    assert int(d['images']) == len(mine)
    assert float(d['agreement']) == pytest.approx(agree / len(ok), abs=1e-6)
  flagged = read_csv(summary['flagged_csv'])
  disagree = {r['path'] for r in rows if not r['error'] and
              r['predicted'] != dirs[r['path'].split('/')[0]]['majority']}
  assert {r['path'] for r in flagged} == disagree
  assert all('folder majority' in r['reasons'] for r in flagged)
  # A review list of the doubted half, from the same CSV (nothing relabelled).
  confidence = {r['path']: max(float(r['p_male']), 1 - float(r['p_male']))
                for r in rows if not r['error']}
  cut = float(np.median(list(confidence.values())))
  again = run(workdir, images_dir, out, review_below=cut)
  assert again['num_labelled_now'] == 0
  review = read_csv(again['review_csv'])
  assert {r['path'] for r in review} == {
      path for path, c in confidence.items() if c < cut}
  assert 0 < len(review) < len(confidence)
  with pytest.raises(label.LabelError, match='--review_below=0.3: '):
    run(workdir, images_dir, out, review_below=0.3)


def test_flipped_labels_rank_at_the_top(workdir, images, tmp_path):
  """Deliberately wrong given labels are the most likely mislabels."""
  images_dir, _ = images
  files = [p for p in image_io.list_images(images_dir)
           if not p.split('/')[-1].startswith('broken')]
  rng = np.random.default_rng(0)
  flipped = set(rng.choice(files, 5, replace=False).tolist())
  labels_csv = tmp_path / 'given.csv'
  with open(labels_csv, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['path', 'label'])
    for p in files:
      male = p.startswith('Male/')
      w.writerow([p, 'female' if male == (p in flipped) else 'male'])
  summary = run(workdir, images_dir, tmp_path / 'l.csv', mc_samples=10,
                labels=str(labels_csv), per_directory=True)
  ranked = read_csv(summary['mislabels_csv'])
  assert len(ranked) == len(files)
  top = {r['path'] for r in ranked[:len(flipped)]}
  assert len(top & flipped) >= 4
  assert {r['path'] for r in ranked[:8]} >= flipped
  with Image.open(summary['mislabels_png']) as im:
    im.verify()
  scores = [float(r['score']) for r in ranked]
  assert scores == sorted(scores, reverse=True)
  flagged = {r['path']: r['reasons'] for r in read_csv(summary['flagged_csv'])}
  assert all('given label' in flagged[p] for p in top & flipped)


def test_folder_layout_gives_labels_and_folder_labels_file(workdir, images,
                                                           tmp_path):
  images_dir, _ = images
  # Automatic: every image is under Male/ or Female/.
  summary = run(workdir, images_dir, tmp_path / 'a.csv')
  assert summary['num_with_given_label'] == 14 + 15 + 3
  # A folder-level labels file (VGGFace2 identity_meta.csv style).
  meta = tmp_path / 'identity_meta.csv'
  meta.write_text('Class_ID, Name, Gender\nMale, x, m\nFemale, y, f\n')
  summary2 = run(workdir, images_dir, tmp_path / 'b.csv', labels=str(meta))
  assert summary2['num_disagree_given'] == summary['num_disagree_given']
  assert (read_csv(summary2['mislabels_csv'])
          == read_csv(summary['mislabels_csv']))
  meta.write_text('path,label\nMale,maybe\n')
  with pytest.raises(ValueError, match='line 2'):
    run(workdir, images_dir, tmp_path / 'c.csv', labels=str(meta))


def test_arguments_sidecar_and_any_image_size(workdir, tmp_path):
  folder = tmp_path / 'imgs'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate([(300, 200), (7, 9), (24, 20)]):
    Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(
        folder / f'{i}.png')
  out = tmp_path / 'l.csv'
  summary = run(workdir, str(folder), out)
  assert summary['num_rows'] == 3 and summary['num_errors'] == 0
  assert 'num_with_given_label' not in summary
  args = json.loads((tmp_path / 'l.csv.args.json').read_text())
  assert args['mc_samples'] == 1 and args['image_size'] == [24, 20]


@pytest.mark.slow
def test_interrupted_run_resumes_without_gaps(workdir, images, tmp_path,
                                              monkeypatch):
  """A run stopped after 2 batches (KeyboardInterrupt) finishes on rerun."""
  images_dir, _ = images
  full = tmp_path / 'full.csv'
  run(workdir, images_dir, full, mc_samples=3)
  out = tmp_path / 'l.csv'
  from gender_jax import predict  # pylint: disable=g-import-not-at-top
  real = predict.Predictor._dispatch  # pylint: disable=protected-access
  calls = []

  def flaky(self, *args):
    calls.append(1)
    if len(calls) == 4:        # Warm-up call + 2 batches, then "killed".
      raise KeyboardInterrupt
    return real(self, *args)

  monkeypatch.setattr(predict.Predictor, '_dispatch', flaky)
  with pytest.raises(KeyboardInterrupt):
    run(workdir, images_dir, out, mc_samples=3)
  monkeypatch.setattr(predict.Predictor, '_dispatch', real)
  partial = read_csv(out)
  assert 0 < len(partial) < len(image_io.list_images(images_dir))
  summary = run(workdir, images_dir, out, mc_samples=3)
  assert summary['num_resumed'] == len(partial)
  assert out.read_text() == full.read_text()


def test_second_run_on_the_same_output_is_refused(workdir, images, tmp_path):
  """A live holder of <output>.lock stops the run before it writes."""
  images_dir, _ = images
  out = tmp_path / 'l.csv'
  with held_elsewhere(tmp_path / 'l.csv.lock') as pid:
    with pytest.raises(locking.LockedError,
                       match=f'label output .*l.csv is in use by pid {pid}'):
      run(workdir, images_dir, out)
  assert not out.exists()
  run(workdir, images_dir, out)     # The holder is gone: stale lock taken.
  assert not (tmp_path / 'l.csv.lock').exists()


@pytest.mark.slow
def test_duplicate_rows_are_repaired_on_resume(workdir, images, tmp_path):
  """Two old-version runs on one output interleaved their rows; the next
  run keeps each image's first row, atomically, and says how many went."""
  images_dir, _ = images
  full = tmp_path / 'full.csv'
  run(workdir, images_dir, full, mc_samples=3)
  lines = full.read_text().splitlines(keepends=True)
  dup = tmp_path / 'dup.csv'
  dup.write_text(''.join(lines[:10] + lines[:1] + lines[1:6] + lines[10:]
                         + lines[3:8]))
  os.link(str(full) + '.args.json', str(dup) + '.args.json')
  summary = run(workdir, images_dir, dup, mc_samples=3)
  assert summary['num_rows_dropped'] == 1 + 5 + 5
  assert summary['num_labelled_now'] == 0
  assert dup.read_text() == full.read_text()
  assert not os.path.exists(label.output_paths(str(dup))['repair'])
  assert run(workdir, images_dir, dup, mc_samples=3)['num_rows_dropped'] == 0


@pytest.mark.slow
def test_file_names_that_are_not_utf8(workdir, images, tmp_path):
  """Old shares' latin-1 names: labelled, written byte for byte, resumed."""
  images_dir, _ = images
  folder = tmp_path / 'imgs'
  shutil.copytree(images_dir, folder)
  name = b'latin1_\xe9\xff.jpg'
  with open(os.fsencode(folder / 'Male') + b'/' + name, 'wb') as f:
    f.write((folder / 'Male' / sorted(os.listdir(folder / 'Male'))[0])
            .read_bytes())
  out = tmp_path / 'l.csv'
  summary = run(workdir, str(folder), out, mc_samples=3, per_directory=True)
  raw = out.read_bytes()
  assert b'\nMale/' + name + b',' in raw
  rows = list(label_report.read_rows(str(out)))
  mine = [r for r in rows if r['path'] == 'Male/' + os.fsdecode(name)]
  assert len(mine) == 1 and not mine[0]['error']
  assert 0 <= float(mine[0]['mc_mean']) <= 1
  assert os.path.exists(summary['mislabels_png'])
  again = run(workdir, str(folder), out, mc_samples=3, per_directory=True)
  assert again['num_labelled_now'] == 0 and again['num_rows_dropped'] == 0
  assert out.read_bytes() == raw


def test_outputs_are_never_inputs(workdir, images, tmp_path):
  """--output inside --images: its CSV, sidecars, summaries and picture are
  not labelled by the next run (nor rows of them left by an old version)."""
  images_dir, _ = images
  folder = tmp_path / 'imgs'
  shutil.copytree(images_dir, folder)
  out = folder / 'Male' / 'labels.csv'
  first = run(workdir, str(folder), out, per_directory=True)
  png = 'Male/labels_mislabels.png'
  assert os.path.exists(first['mislabels_png'])
  with open(out, 'a') as f:    # The row an old version wrote for the picture.
    f.write(f'{png},0.5,male,\n')
  second = run(workdir, str(folder), out, per_directory=True)
  assert second['num_files'] == first['num_files']
  assert second['num_rows_dropped'] == 1
  assert all('labels' not in r['path'] for r in read_csv(out))
  # Every output file is excluded, whatever its name and location.
  odd = folder / 'a' / 'b.png'
  assert label.own_outputs(str(folder), label.output_paths(str(odd))) == {
      'a/b.png', 'a/b.png.args.json', 'a/b.png.lock', 'a/b.png.repair.tmp',
      'a/b.png.ray', 'a/b.png_per_directory.csv', 'a/b.png_flagged.csv',
      'a/b.png_mislabels.csv', 'a/b.png_mislabels.png', 'a/b.png_review.csv'}
  assert label.own_outputs(str(folder / 'Male'),
                           label.output_paths(str(tmp_path / 'x.csv'))) == set()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_user_errors_are_one_line_exit_2(workdir, images, tmp_path):
  """Missing workdir or folder, bad flags, a held lock: one line, status 2."""
  images_dir, _ = images
  out = str(tmp_path / 'l.csv')
  ok = [f'--workdir={workdir}', f'--images={images_dir}', f'--output={out}']
  cases = {
      'not a gender_jax workdir': [f'--workdir={tmp_path / "none"}'] + ok[1:],
      'is not a directory': ok[:1] + [f'--images={tmp_path / "none"}'] + ok[2:],
      'mc_samples': ok + ['--mc_samples=0'],
      '--output must have a value': ok[:2],
      'unexpected arguments': ok + ['extra'],
      '--boxes: ': ok + [f'--boxes={tmp_path / "none.csv"}'],
      'resize': ok + ['--resize=fit'],
      'review_below': ok + ['--review_below=0.4'],
      'is a directory: give the path of the CSV': ok[:2] + [
          f'--output={images_dir}'],
      'in use by pid': ok,
  }
  # No JAX_PLATFORMS: these errors come before JAX probes any backend.
  env = dict(os.environ, GENDER_JAX_NO_REEXEC='1')
  with held_elsewhere(tmp_path / 'l.csv.lock'):
    for expected, args in cases.items():
      result = subprocess.run(
          [sys.executable, os.path.join(REPO, 'scripts', 'label.py')] + args,
          capture_output=True, text=True, env=env, timeout=300, check=False)
      assert result.returncode == 2, (expected, result.stderr)
      assert result.stderr.count('\n') == 1, (expected, result.stderr)
      assert result.stderr.startswith('label.py: error: ')
      assert expected in result.stderr, (expected, result.stderr)
  assert not os.path.exists(out)


# ---------------------------------------------------------------- framing --


@pytest.fixture(scope='module')
def framed_images(tmp_path_factory):
  """Wide faces (24 x 60), faces at the model's aspect (48 x 40) and a photo
  with a face box; returns the folder."""
  folder = tmp_path_factory.mktemp('framed')
  rng = np.random.default_rng(3)
  for i in range(4):
    face = synthetic.face_image(rng, i % 2 == 0, (24, 20))
    wide = np.concatenate([rng.integers(0, 255, (24, 20, 3), np.uint8), face,
                           rng.integers(0, 255, (24, 20, 3), np.uint8)], 1)
    Image.fromarray(wide).save(folder / f'wide{i}.png')
    Image.fromarray(synthetic.face_image(rng, i % 2 == 1, (48, 40))).save(
        folder / f'model{i}.png')
  photo = rng.integers(0, 255, (100, 120, 3), np.uint8)
  photo[30:78, 50:90] = synthetic.face_image(rng, True, (48, 40))
  (folder / 'photos').mkdir()
  Image.fromarray(photo).save(folder / 'photos' / 'photo.png')
  Image.fromarray(photo[30:78, 50:90]).save(folder / 'photos' / 'cut.png')
  return str(folder)


def _p_male(path):
  return {r['path']: r['p_male'] for r in read_csv(path)}


def test_crop_and_stretch_differ_only_off_the_model_aspect(
    workdir, framed_images, tmp_path):
  stretch = run(workdir, framed_images, tmp_path / 's.csv')
  crop = run(workdir, framed_images, tmp_path / 'c.csv', resize='crop')
  assert (stretch['resize'], crop['resize']) == ('stretch', 'crop')
  s, c = _p_male(tmp_path / 's.csv'), _p_male(tmp_path / 'c.csv')
  for i in range(4):
    assert s[f'model{i}.png'] == c[f'model{i}.png']
    assert s[f'wide{i}.png'] != c[f'wide{i}.png']
  # The centre crop of a wide image is its face: as if given the face alone.
  from gender_jax import predict  # pylint: disable=g-import-not-at-top
  batch = np.stack([
      image_io.decode(os.path.join(framed_images, f'wide{i}.png'), (24, 20),
                      'crop')[0] for i in range(4)])
  want = predict.Predictor.from_workdir(workdir, batch_size=8).predict(batch)
  np.testing.assert_allclose([float(c[f'wide{i}.png']) for i in range(4)],
                             want['p_male'], rtol=1e-5)


def test_face_boxes_crop_the_listed_images(workdir, framed_images, tmp_path):
  boxes = tmp_path / 'loose_bb.csv'
  boxes.write_text('NAME_ID,X,Y,W,H\nphotos/photo,50,30,40,48\n')
  summary = run(workdir, framed_images, tmp_path / 'b.csv', boxes=str(boxes),
                box_margin=0.0)
  assert summary['boxes'] == str(boxes) and summary['box_margin'] == 0.0
  run(workdir, framed_images, tmp_path / 'p.csv')
  boxed, plain = _p_male(tmp_path / 'b.csv'), _p_male(tmp_path / 'p.csv')
  assert boxed['photos/photo.png'] == plain['photos/cut.png']
  assert boxed['photos/photo.png'] != plain['photos/photo.png']
  del boxed['photos/photo.png'], plain['photos/photo.png']
  assert boxed == plain                  # Images without a box: unchanged.


def test_resume_with_other_framing_is_refused(workdir, framed_images,
                                              tmp_path):
  out = tmp_path / 'l.csv'
  run(workdir, framed_images, out, resize='pad')
  args = json.loads((tmp_path / 'l.csv.args.json').read_text())
  assert args['resize'] == 'pad' and 'boxes' not in args
  with pytest.raises(label_csv.ResumeError,
                     match="resize: was 'pad', now None"):
    run(workdir, framed_images, out)
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('photos/photo.png,50,30,40,48\n')
  with pytest.raises(label_csv.ResumeError, match='boxes: was None'):
    run(workdir, framed_images, out, resize='pad', boxes=str(boxes))
  assert run(workdir, framed_images, out, resize='pad')[
      'num_labelled_now'] == 0


def _with_dataset_metadata(workdir, tmp_path, meta):
  """A copy of `workdir` whose config's data_dir holds `meta` as the
  dataset's metadata.json (as prepare_data.py writes it)."""
  copy = str(tmp_path / 'w')
  shutil.copytree(workdir, copy)
  data_dir = tmp_path / 'data'
  (data_dir / 'gender_faces' / '1.0.0').mkdir(parents=True)
  (data_dir / 'gender_faces' / '1.0.0' / 'metadata.json').write_text(
      json.dumps(meta))
  config_path = os.path.join(copy, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  config['data_dir'] = str(data_dir)
  with open(config_path, 'w') as f:
    json.dump(config, f)
  return copy, str(data_dir / 'gender_faces' / '1.0.0' / 'metadata.json')


def test_framing_defaults_to_the_training_datasets(workdir, framed_images,
                                                   tmp_path, caplog):
  meta = {'sources': {}, 'resize': 'crop', 'box_margin': 0.25}
  copy, meta_path = _with_dataset_metadata(workdir, tmp_path, meta)
  with caplog.at_level('INFO'):
    summary = run(copy, framed_images, tmp_path / 'd.csv')
  assert summary['resize'] == 'crop'
  assert (f'Framing: resize=crop (training data {meta_path}), no face '
          'boxes.') in caplog.text
  args = json.loads((tmp_path / 'd.csv.args.json').read_text())
  assert args['resize'] == 'crop'
  crop = run(workdir, framed_images, tmp_path / 'c.csv', resize='crop')
  assert _p_male(tmp_path / 'd.csv') == _p_male(tmp_path / 'c.csv')
  assert crop['resize'] == 'crop'


def test_resume_cut_inside_a_record_with_a_newline(workdir, images,
                                                     tmp_path):
  """A file name holding a newline is one quoted CSV record over two lines;
  a run killed inside it resumes to the full CSV (every cut:
  label_csv_test)."""
  images_dir, _ = images
  folder = tmp_path / 'imgs'
  shutil.copytree(images_dir, folder)
  male = folder / 'Male'
  shutil.copyfile(male / sorted(os.listdir(male))[0], male / 'two\nlines.jpg')
  full = tmp_path / 'full.csv'
  run(workdir, str(folder), full)
  raw = full.read_bytes()
  start = raw.index(b'"Male/two\nlines.jpg"')
  part = tmp_path / 'part.csv'
  part.write_bytes(raw[:start + 12])           # Inside the quoted name.
  os.link(str(full) + '.args.json', str(part) + '.args.json')
  summary = run(workdir, str(folder), part)
  assert summary['num_rows_dropped'] == 0
  assert part.read_bytes() == raw
