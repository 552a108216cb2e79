"""The exported ONNX model gives the JAX model's outputs under ONNX Runtime."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

# pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import checkpointing
from gender_jax import config_lib
from gender_jax import errors
from gender_jax import label
from gender_jax import models
from gender_jax import onnx_export
from gender_jax import onnx_predict
from gender_jax import predict
from gender_jax import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Odd sizes on the way down (pooling floors) and a 3x2 final map, so the
# flatten order of Dense_0's rows matters.
CNN_SIZE = (50, 38)


def _jax_outputs(config, variables, images):
  logits = models.create_model(config).apply(variables, images, train=False)
  return np.asarray(logits), np.asarray(jax.nn.sigmoid(logits))


def _cnn(seed=0):
  """The full-width model at CNN_SIZE with random BatchNorm parameters and
  statistics (init's are the identity, which would hide folding errors)."""
  config = config_lib.load_sibling(os.path.join(REPO, 'configs', 'x'),
                                   'default.py')
  config.image_size = CNN_SIZE
  variables = models.init_variables(models.create_model(config),
                                    jax.random.key(seed), CNN_SIZE)
  rng = np.random.default_rng(seed)
  ranges = {'scale': (0.5, 1.5), 'bias': (-0.3, 0.3), 'mean': (-0.3, 0.3),
            'var': (0.3, 2.0)}

  def perturb(path, x):
    r = ranges.get(path[-1].key)
    return x if r is None else rng.uniform(*r, x.shape).astype(np.float32)

  return config, jax.tree_util.tree_map_with_path(perturb, variables)


def _faces(n, size, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([synthetic.face_image(rng, bool(i % 2), size)
                   for i in range(n)])


def _assert_close(got, logits, p):
  np.testing.assert_allclose(got['logit'], logits, rtol=1e-4, atol=1e-4)
  assert np.abs(got['p_male'] - p).max() <= 1e-5


def test_cnn_graph_checks_and_equals_jax():
  config, variables = _cnn()
  images = _faces(6, CNN_SIZE)
  logits, p = _jax_outputs(config, variables, images)
  assert p.std() > 0.01                 # Not saturated.
  model = onnx_export.build_model(variables, CNN_SIZE)
  onnx.checker.check_model(model, full_check=True)
  runner = onnx_predict.OnnxModel(model.SerializeToString())
  assert runner.image_size == CNN_SIZE and runner.input_dtype == np.float32
  _assert_close(runner(images), logits, p)
  # Dynamic batch: one image and an odd batch give the same numbers.
  _assert_close(runner(images[:1]), logits[:1], p[:1])
  _assert_close(runner(images[1:4].astype(np.float32)), logits[1:4], p[1:4])


@pytest.mark.parametrize('input_dtype', ['float32', 'uint8'])
def test_exported_workdir_equals_jax(tmp_path, make_workdir, synthetic_batch,
                                     input_dtype):
  """The tiny trained workdir (trained BatchNorm statistics) via the file."""
  workdir = make_workdir(tmp_path / 'w')
  config, _, variables, _ = checkpointing.load_model(workdir)
  output = str(tmp_path / 'out' / 'model.onnx')
  summary = onnx_export.export_workdir(workdir, output,
                                       input_dtype=input_dtype)
  assert summary['step'] == 7 and os.path.getsize(output) == summary['bytes']
  images, labels = synthetic_batch(20, seed=5)
  logits, p = _jax_outputs(config, variables, images)
  got = onnx_predict.OnnxModel(output)(images)
  _assert_close(got, logits, p)
  assert ((got['p_male'] >= 0.5) == labels).mean() >= 0.9


def test_predictor_onnxruntime_equals_jax(tmp_path, make_workdir,
                                          synthetic_batch):
  workdir = make_workdir(tmp_path / 'w')
  images, _ = synthetic_batch(21, seed=6)
  want = predict.Predictor.from_workdir(workdir, batch_size=8).predict(images)
  predictor = predict.Predictor.from_workdir(workdir, batch_size=8,
                                             runtime='onnxruntime')
  got = predictor.predict(images)
  assert set(got) == {'logit', 'p_male'} and got['p_male'].shape == (21,)
  _assert_close(got, want['logit'], want['p_male'])
  with pytest.raises(ValueError, match='MC-Dropout runs only in JAX'):
    predict.Predictor.from_workdir(workdir, mc_samples=4,
                                   runtime='onnxruntime')


def _p_male(path):
  with open(path, newline='') as f:
    return {r['path']: float(r['p_male']) for r in csv.DictReader(f)}


def test_labeller_onnxruntime_equals_jax(tmp_path, make_workdir):
  workdir = make_workdir(tmp_path / 'w')
  images = str(tmp_path / 'faces')
  synthetic.make_raw_dataset(images, counts={'Test': (6, 7)}, seed=3)
  outputs = {}
  for runtime in ('jax', 'onnxruntime'):
    outputs[runtime] = str(tmp_path / f'{runtime}.csv')
    summary = label.label_images(workdir, images, outputs[runtime],
                                 batch_size=8, progress=False,
                                 runtime=runtime)
    assert summary['num_rows'] == 13 and summary['num_errors'] == 0
  want, got = _p_male(outputs['jax']), _p_male(outputs['onnxruntime'])
  assert want.keys() == got.keys()
  assert max(abs(want[k] - got[k]) for k in want) <= 1e-5
  with open(outputs['onnxruntime'] + '.args.json') as f:
    assert json.load(f)['runtime'] == 'onnxruntime'
  # A CSV is never continued with the other runtime.
  with pytest.raises(errors.UserError, match="runtime: was None, now 'onnxrun"):
    label.label_images(workdir, images, outputs['jax'], batch_size=8,
                       progress=False, runtime='onnxruntime')


def test_fold_batchnorm_against_formula():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(6, 4)).astype(np.float32)
  params = {'scale': rng.uniform(0.5, 2, 4), 'bias': rng.normal(size=4)}
  stats = {'mean': rng.normal(size=4), 'var': rng.uniform(0.5, 2, 4)}
  x = rng.normal(size=(3, 6)).astype(np.float32)
  want = ((x @ kernel - stats['mean']) / np.sqrt(stats['var'] + 1e-3) *
          params['scale'] + params['bias'])
  k, b = onnx_export.fold_batchnorm(kernel, params, stats)
  np.testing.assert_allclose(x @ k + b, want, rtol=1e-5, atol=1e-5)


@pytest.mark.multiprocess
def test_onnx_predict_does_not_import_jax():
  code = ('import sys; from gender_jax import onnx_predict; '
          'assert "jax" not in sys.modules and "flax" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


@pytest.mark.multiprocess
def test_script_exports_and_fails_in_one_line(tmp_path, make_workdir):
  workdir = make_workdir(tmp_path / 'w')
  script = os.path.join(REPO, 'scripts', 'export.py')
  env = {**os.environ, 'GENDER_JAX_NO_REEXEC': '1'}
  output = tmp_path / 'm.onnx'
  ok = subprocess.run([sys.executable, script, f'--workdir={workdir}',
                       '--format=onnx', f'--output={output}',
                       '--input_dtype=uint8'], capture_output=True, text=True,
                      env=env, check=False)
  assert ok.returncode == 0, ok.stderr
  assert onnx_predict.OnnxModel(str(output)).input_dtype == np.uint8
  bad = subprocess.run([sys.executable, script,
                        f'--workdir={tmp_path / "none"}',
                        f'--output={tmp_path / "x.onnx"}'],
                       capture_output=True, text=True, env=env, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('export.py: error:')
