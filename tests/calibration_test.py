"""Tests for gender_jax.calibration: the temperature fit, calibration.json,
and that every runtime hands out the calibrated p(male)."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gender_jax import calibration
from gender_jax import checkpointing
from gender_jax import dataset
from gender_jax import errors
from gender_jax import evaluate
from gender_jax import label
from gender_jax import predict
from gender_jax import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPERATURE = 1.7
COUNTS = {'Train': (4, 4), 'Validation': (9, 8), 'Test': (6, 7)}


def sigmoid(z):
  return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def calibrate(workdir, temperature=TEMPERATURE, step=7):
  """Writes a calibration.json (make_workdir's best model is step 7)."""
  calibration.write_calibration(workdir, {'temperature': temperature,
                                          'step': step, 'split': 'validation'})
  return workdir


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory, make_workdir):
  """(uncalibrated, calibrated at TEMPERATURE) workdirs of the same model."""
  plain = make_workdir(tmp_path_factory.mktemp('plain'))
  return plain, calibrate(make_workdir(tmp_path_factory.mktemp('calibrated')))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_size):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  synthetic.make_tfds_dataset(data_dir, image_size=image_size, counts=COUNTS)
  return data_dir


def _raw_logits(workdir, images):
  _, model, variables, _ = checkpointing.load_model(workdir)
  return np.asarray(model.apply(variables, images, train=False), np.float64)


# ---------------------------------------------------------------- the fit --


@pytest.mark.parametrize('true_temperature', [0.5, TEMPERATURE, 3.0])
def test_fit_recovers_a_known_temperature(true_temperature):
  rng = np.random.default_rng(0)
  z = rng.normal(0, 2.5, 20_000)              # Calibrated logits...
  labels = (rng.random(z.shape) < sigmoid(z)).astype(int)
  got = calibration.fit_temperature(z * true_temperature, labels)
  assert got == pytest.approx(true_temperature, rel=0.03)
  result = calibration.fit(labels, z * true_temperature)
  assert result['temperature'] == got
  assert result['log_loss_after'] <= result['log_loss_before']
  assert result['ece_after'] < 0.02


def test_fit_edge_cases():
  assert calibration.fit_temperature(np.zeros(4), [0, 1, 0, 1]) == 1.0
  # No mistake on the split: no evidence for any other temperature.
  assert calibration.fit_temperature([-1., 1.], [0, 1]) == 1.0
  # One mistake among confident right answers: sharper than 1, inside range.
  fitted = calibration.fit_temperature([-3., -2., 2., 3., -0.5], [0, 0, 1, 1, 1])
  assert calibration.MIN_TEMPERATURE < fitted < 1.0
  with pytest.raises(ValueError, match='equal-length'):
    calibration.fit_temperature(np.ones(3), np.ones(2))
  with pytest.raises(ValueError, match='finite'):
    calibration.fit_temperature([np.inf, 1.], [0, 1])


# ---------------------------------------------------------------- the file --


def test_file_round_trip_absent_and_stale(tmp_path):
  workdir = str(tmp_path)
  assert calibration.read_temperature(workdir) == 1.0      # No file.
  assert calibration.read_calibration(workdir) is None
  calibrate(workdir, 2.5, step=3)
  assert calibration.read_temperature(workdir) == 2.5
  assert calibration.read_temperature(workdir, step=3) == 2.5
  assert calibration.read_calibration(workdir)['split'] == 'validation'
  with pytest.raises(calibration.CalibrationError,
                     match='step 3, but the model loaded is step 9'):
    calibration.read_temperature(workdir, step=9)


@pytest.mark.parametrize('text', ['{"temperature": ', '[1.5]', '{}',
                                  '{"temperature": -1}',
                                  '{"temperature": "nan"}'])
def test_corrupt_file_is_a_one_line_user_error(tmp_path, text):
  (tmp_path / calibration.CALIBRATION_FILE).write_text(text)
  with pytest.raises(errors.UserError) as e:
    calibration.read_temperature(str(tmp_path))
  message = str(e.value)
  assert calibration.CALIBRATION_FILE in message
  assert 'scripts/calibrate.py' in message and '\n' not in message


# ---------------------------------------------------- every runtime uses it --


def test_predictor_jax_deterministic(workdirs, synthetic_batch):
  plain, calibrated = workdirs
  images, _ = synthetic_batch(12, seed=1)
  raw = _raw_logits(plain, images)
  assert predict.Predictor.from_workdir(plain).temperature == 1.0
  predictor = predict.Predictor.from_workdir(calibrated, batch_size=8)
  assert predictor.temperature == TEMPERATURE
  out = predictor.predict(images)
  np.testing.assert_allclose(out['logit'], raw / TEMPERATURE, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(out['p_male'], sigmoid(raw / TEMPERATURE),
                             atol=1e-6)
  # An explicit temperature wins over the file.
  out = predict.Predictor.from_workdir(calibrated, batch_size=8,
                                       temperature=1.0).predict(images)
  np.testing.assert_allclose(out['logit'], raw, rtol=1e-5, atol=1e-5)


def test_predictor_mc_dropout_divides_every_sample(workdirs, synthetic_batch):
  _, calibrated = workdirs
  images, _ = synthetic_batch(5, seed=2)
  ids = np.arange(20, 25, dtype=np.uint32)
  samples, seed = 6, 3
  out = predict.Predictor.from_workdir(calibrated, mc_samples=samples,
                                       seed=seed, batch_size=8).predict(
                                           images, ids)
  _, model, variables, _ = checkpointing.load_model(calibrated)
  logits = np.stack([[
      float(model.apply(variables, image[None], train=False, mc_dropout=True,
                        rngs={'dropout': key})[0])
      for key in jax.random.split(
          jax.random.fold_in(jax.random.key(seed), i), samples)]
                     for image, i in zip(images, ids)]).T          # (S, N)
  want = jax.tree.map(np.asarray,
                      predict.mc_statistics(logits / TEMPERATURE))
  assert np.abs(out['mc_std']).min() > 1e-4            # Really stochastic.
  for key in predict.MC_KEYS:
    np.testing.assert_allclose(out[key], want[key], rtol=1e-4, atol=1e-5)


def test_onnx_runtimes_equal_jax_calibrated(workdirs, synthetic_batch,
                                            tmp_path):
  pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')
  from gender_jax import onnx_export  # pylint: disable=g-import-not-at-top
  from gender_jax import onnx_predict  # pylint: disable=g-import-not-at-top
  _, calibrated = workdirs
  images, _ = synthetic_batch(20, seed=3)
  want = predict.Predictor.from_workdir(calibrated,
                                        batch_size=8).predict(images)
  ort_predictor = predict.Predictor.from_workdir(calibrated, batch_size=8,
                                                 runtime='onnxruntime')
  summary = onnx_export.export_workdir(calibrated, str(tmp_path / 'm.onnx'))
  assert summary['temperature'] == TEMPERATURE
  exported = onnx_predict.OnnxModel(str(tmp_path / 'm.onnx'))(images)
  for got in (ort_predictor.predict(images), exported):
    assert np.abs(got['p_male'] - want['p_male']).max() <= 1e-4
    np.testing.assert_allclose(got['logit'], want['logit'], rtol=1e-4,
                               atol=1e-4)


def test_evaluate_reports_before_and_after(workdirs, data_dir):
  plain, calibrated = workdirs
  kwargs = dict(data_dir=data_dir, split='test', output_dir=None)
  before = evaluate.evaluate(plain, **kwargs)
  after = evaluate.evaluate(calibrated, tta='flip', **kwargs)
  assert before['temperature'] == 1.0 and before['tta'] == 'none'
  assert before['ece'] == before['ece_uncalibrated']
  assert after['temperature'] == TEMPERATURE and after['tta'] == 'flip'
  # Independently: the flip-averaged logits of every test example.
  examples = list(tfds.as_numpy(
      dataset.load_builder(data_dir).as_dataset(split='test')))
  x = np.stack([e['images'] for e in examples])
  y = np.asarray([e['label'] for e in examples])
  raw = (_raw_logits(plain, x) + _raw_logits(plain, x[:, :, ::-1])) / 2
  assert after['log_loss_uncalibrated'] == pytest.approx(
      evaluate.log_loss(y, raw), rel=1e-4)
  assert after['log_loss'] == pytest.approx(
      evaluate.log_loss(y, raw / TEMPERATURE), rel=1e-4)
  assert after['accuracy'] == pytest.approx(
      np.mean((raw >= 0) == (y == 1)))
  table = evaluate.format_report(after)
  assert 'temperature 1.7000' in table and 'uncalibrated' in table
  with open(os.path.join(after['output_dir'], 'report.json')) as f:
    saved = json.load(f)
  assert saved['temperature'] == TEMPERATURE and 'ece_uncalibrated' in saved


def test_calibrate_workdir_fits_writes_and_is_used(data_dir, tmp_path,
                                                   make_workdir):
  workdir = make_workdir(tmp_path / 'w')
  result = calibration.calibrate_workdir(workdir, data_dir)
  with open(os.path.join(workdir, calibration.CALIBRATION_FILE)) as f:
    assert json.load(f) == result
  assert (result['split'], result['step'], result['num_examples']) == (
      'validation', 7, 17)
  assert result['log_loss_after'] <= result['log_loss_before']
  report = evaluate.evaluate(workdir, data_dir, 'validation')
  assert report['temperature'] == result['temperature']
  assert report['log_loss'] == pytest.approx(result['log_loss_after'],
                                             rel=1e-4)
  assert report['log_loss_uncalibrated'] == pytest.approx(
      result['log_loss_before'], rel=1e-4)
  assert 'ECE' in calibration.describe(result)
  with pytest.raises(errors.UserError, match="'nosuch'"):
    calibration.calibrate_workdir(workdir, data_dir, 'nosuch')


def _sidecar(path):
  with open(str(path) + '.args.json') as f:
    return json.load(f)


def test_labeller_records_temperature_and_tta(tmp_path, make_workdir):
  workdir = make_workdir(tmp_path / 'w')
  images = str(tmp_path / 'faces')
  synthetic.make_raw_dataset(images, counts={'Test': (3, 3)}, seed=4)
  out = tmp_path / 'l.csv'
  label.label_images(workdir, images, str(out), batch_size=8, progress=False)
  assert 'temperature' not in _sidecar(out)    # Uncalibrated: as before.
  calibrate(workdir)
  with pytest.raises(errors.UserError, match='temperature: was None, now 1.7'):
    label.label_images(workdir, images, str(out), batch_size=8,
                       progress=False)
  flipped = tmp_path / 'flip.csv'
  summary = label.label_images(workdir, images, str(flipped), batch_size=8,
                               progress=False, tta='flip')
  assert (summary['temperature'], summary['tta']) == (TEMPERATURE, 'flip')
  assert _sidecar(flipped)['temperature'] == TEMPERATURE
  assert _sidecar(flipped)['tta'] == 'flip'
  with open(flipped, newline='') as f:
    rows = {r['path']: float(r['p_male']) for r in csv.DictReader(f)}
  paths = sorted(rows)
  want = np.concatenate([
      batch.outputs['p_male'] for batch in predict.Predictor.from_workdir(
          workdir, tta='flip').predict_files(
              [os.path.join(images, p) for p in paths])])
  np.testing.assert_allclose([rows[p] for p in paths], want, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_calibrates_and_fails_in_one_line(data_dir, tmp_path,
                                                 make_workdir):
  workdir = make_workdir(tmp_path / 'w')
  script = os.path.join(REPO, 'scripts', 'calibrate.py')
  env = dict(os.environ, JAX_PLATFORMS='cpu', GENDER_JAX_NO_REEXEC='1')
  ok = subprocess.run([sys.executable, script, f'--workdir={workdir}',
                       f'--data_dir={data_dir}'], capture_output=True,
                      text=True, cwd=REPO, env=env, check=False)
  assert ok.returncode == 0, ok.stderr
  temperature = calibration.read_temperature(workdir, step=7)
  assert f'temperature {temperature:.4f} on validation' in ok.stdout
  assert 'ECE' in ok.stdout and '->' in ok.stdout
  for args, message in (([f'--workdir={tmp_path / "none"}'],
                         'not a gender_jax workdir'),
                        ([f'--workdir={workdir}', f'--data_dir={data_dir}',
                          '--split=nosuch'], "'nosuch'")):
    bad = subprocess.run([sys.executable, script, *args], capture_output=True,
                         text=True, cwd=REPO, env=env, check=False)
    lines = bad.stderr.splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith('calibrate.py: error: ') and message in lines[0]
