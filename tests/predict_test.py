"""Tests for gender_jax.predict on the tiny trained workdir (tests/conftest.py)."""

import io
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gender_jax import checkpointing
from gender_jax import models
from gender_jax import predict
from gender_jax import synthetic


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_workdir):
  return make_workdir(tmp_path_factory.mktemp('w'))


def test_trained_model_separates_classes(workdir, synthetic_batch):
  images, labels = synthetic_batch(40, seed=9)
  out = predict.Predictor.from_workdir(workdir, batch_size=16).predict(images)
  assert ((out['p_male'] >= 0.5) == labels).mean() >= 0.9


def test_predict_matches_model_apply_and_pads(workdir, synthetic_batch):
  config, model, variables, _ = checkpointing.load_model(workdir)
  images, _ = synthetic_batch(21, seed=2)
  out = predict.Predictor(model, variables, config.image_size,
                          batch_size=8).predict(images)
  want = model.apply(variables, images, train=False)
  assert set(out) == {'logit', 'p_male'} and out['p_male'].shape == (21,)
  np.testing.assert_allclose(out['logit'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['p_male'], jax.nn.sigmoid(want), atol=1e-6)


def test_mc_statistics_against_numpy():
  logits = np.random.default_rng(0).normal(0, 2, (7, 5)).astype(np.float32)
  got = jax.tree.map(np.asarray, predict.mc_statistics(jnp.asarray(logits)))
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  h = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))
  np.testing.assert_allclose(got['mc_mean'], p.mean(0), rtol=1e-5)
  np.testing.assert_allclose(got['mc_std'], p.std(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got['mc_entropy'], h(p.mean(0)), rtol=1e-4)
  np.testing.assert_allclose(got['mc_mutual_info'],
                             h(p.mean(0)) - h(p).mean(0), atol=1e-5)


def test_mc_dropout_zero_rate_has_no_uncertainty(tmp_path, make_workdir,
                                                 synthetic_batch):
  workdir = make_workdir(tmp_path, dropout=0.0)
  images, _ = synthetic_batch(10, seed=3)
  out = predict.Predictor.from_workdir(workdir, mc_samples=8,
                                       batch_size=8).predict(images)
  np.testing.assert_allclose(out['mc_std'], 0, atol=1e-6)
  np.testing.assert_allclose(out['mc_mutual_info'], 0, atol=1e-6)
  np.testing.assert_allclose(out['mc_mean'], out['p_male'], atol=1e-6)


def test_mc_dropout_positive_rate_is_stochastic_and_deterministic_per_id(
    workdir, synthetic_batch):
  images, _ = synthetic_batch(12, seed=4)
  ids = np.arange(100, 112, dtype=np.uint32)
  pred = predict.Predictor.from_workdir(workdir, mc_samples=16, batch_size=8)
  out = pred.predict(images, ids)
  assert (out['mc_std'] > 1e-4).all() and (out['mc_mutual_info'] > 0).all()
  # Same ids, other batch size and order: same MC numbers (keys per image).
  other = predict.Predictor.from_workdir(workdir, mc_samples=16, batch_size=4)
  rev = other.predict(images[::-1], ids[::-1])
  for k in predict.MC_KEYS:
    np.testing.assert_allclose(rev[k][::-1], out[k], rtol=1e-5, atol=1e-6)
  # BatchNorm uses running averages: the mean of many samples is close to
  # the deterministic prediction, not shifted by batch statistics.
  many = predict.Predictor.from_workdir(workdir, mc_samples=256, batch_size=8)
  assert np.abs(many.predict(images, ids)['mc_mean'] - out['p_male']).max() < 0.15


def test_predict_files_yields_each_batch_in_order_unpadded(workdir, tmp_path):
  """Batches of batch_size paths in order (the last one short), framed as
  `image_io.decode` frames them: the numbers of `predict` on the decoded
  images with the paths' ids, NaN and the reason for unreadable files."""
  synthetic.make_raw_dataset(str(tmp_path), counts={'Test': (4, 5)})
  synthetic.add_broken_files(str(tmp_path / 'Test' / 'Male'))
  from gender_jax import image_io  # pylint: disable=g-import-not-at-top
  paths = [str(tmp_path / 'Test' / p)
           for p in image_io.list_images(str(tmp_path / 'Test'))]
  boxes = [(1, 1, 10, 12)] + [None] * (len(paths) - 1)
  predictor = predict.Predictor.from_workdir(workdir, mc_samples=3,
                                             batch_size=4)
  batches = list(predictor.predict_files(paths, resize='crop', boxes=boxes,
                                      box_margin=0.1, num_workers=2))
  assert [(b.start, len(b.errors)) for b in batches] == [
      (i, min(4, len(paths) - i)) for i in range(0, len(paths), 4)]
  decoded = [image_io.decode(p, predictor.image_size, 'crop', box, 0.1)
             for p, box in zip(paths, boxes)]
  assert [e for b in batches for e in b.errors] == [r for _, r in decoded]
  ok = [i for i, (image, _) in enumerate(decoded) if image is not None]
  assert 0 < len(ok) < len(paths)
  want = predictor.predict(np.stack([decoded[i][0] for i in ok]),
                           predict.path_ids(paths)[ok])
  assert set(want) == set(batches[0].outputs)
  for k, values in want.items():
    got = np.concatenate([b.outputs[k] for b in batches])
    np.testing.assert_allclose(got[ok], values, rtol=1e-5, atol=1e-6)
    assert np.isnan(np.delete(got, ok)).all()


def test_settings_and_warm_up(workdir):
  predictor = predict.Predictor.from_workdir(workdir, mc_samples=2, seed=3,
                                             batch_size=8, tta='flip')
  assert predictor.settings() == {
      'mc_samples': 2, 'seed': 3, 'runtime': 'jax', 'temperature': 1.0,
      'tta': 'flip', 'checkpoint_step': 7}
  # warm_up compiles the one program a batch runs: predicting after it,
  # a full batch or a short one (padded), compiles nothing more.
  assert predictor._fn._cache_size() == 0
  predictor.warm_up()
  assert predictor._fn._cache_size() == 1
  predictor.predict(np.zeros((3, *predictor.image_size, 3), np.uint8))
  assert predictor._fn._cache_size() == 1


def test_path_ids_hash_the_file_name_bytes():
  """Any name os.listdir can return has an id: a name that is not valid UTF-8
  (a str with surrogate escapes) hashes as its original bytes."""
  name = os.fsdecode(b'Male/latin1_\xe9\xff.jpg')
  ids = predict.path_ids(['Male/a.jpg', name, b'Male/latin1_\xe9\xff.jpg'])
  assert ids.dtype == np.uint32
  assert ids[0] == zlib.crc32(b'Male/a.jpg')
  assert ids[1] == ids[2] == zlib.crc32(b'Male/latin1_\xe9\xff.jpg')


def test_bad_arguments(tiny_config):
  model = models.create_model(tiny_config())
  with pytest.raises(ValueError, match='mc_samples'):
    predict.make_predict_fn(model, mc_samples=0)
  with pytest.raises(ValueError, match="tta='rotate'"):
    predict.make_predict_fn(model, tta='rotate')
  for temperature in (0.0, -1.0, float('nan')):
    with pytest.raises(ValueError, match='temperature'):
      predict.make_predict_fn(model, temperature=temperature)


def test_flip_tta_averages_the_logits_of_image_and_mirror(workdir,
                                                          synthetic_batch):
  """Deterministic and per MC sample (one dropout key for both views),
  then divided by the temperature."""
  config, model, variables, _ = checkpointing.load_model(workdir)
  images, _ = synthetic_batch(5, seed=7)
  ids = np.arange(30, 35, dtype=np.uint32)
  samples, temperature = 4, 1.3
  out = predict.Predictor(model, variables, config.image_size, batch_size=8,
                          mc_samples=samples, temperature=temperature,
                          tta='flip').predict(images, ids)
  mirrors = images[:, :, ::-1]

  def logits(x, **kwargs):
    return np.asarray(model.apply(variables, x, train=False, **kwargs))

  want = (logits(images) + logits(mirrors)) / 2 / temperature
  np.testing.assert_allclose(out['logit'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['p_male'], jax.nn.sigmoid(want), atol=1e-6)
  sample_logits = np.stack([[
      (logits(image[None], mc_dropout=True, rngs={'dropout': key})
       + logits(mirror[None], mc_dropout=True, rngs={'dropout': key}))[0] / 2
      for key in jax.random.split(jax.random.fold_in(jax.random.key(0), i),
                                  samples)]
                            for image, mirror, i in zip(images, mirrors, ids)])
  want_mc = predict.mc_statistics(jnp.asarray(sample_logits.T / temperature))
  for k in predict.MC_KEYS:
    np.testing.assert_allclose(out[k], want_mc[k], rtol=1e-4, atol=1e-5)


def test_flip_tta_onnxruntime_equals_jax(workdir, synthetic_batch):
  pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')
  images, _ = synthetic_batch(11, seed=8)
  want = predict.Predictor.from_workdir(workdir, batch_size=8, tta='flip',
                                        temperature=1.3).predict(images)
  got = predict.Predictor.from_workdir(workdir, batch_size=8, tta='flip',
                                       temperature=1.3,
                                       runtime='onnxruntime').predict(images)
  np.testing.assert_allclose(got['logit'], want['logit'], rtol=1e-4,
                             atol=1e-4)
  assert np.abs(got['p_male'] - want['p_male']).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_four_devices_match_one(workdir, synthetic_batch):
  """Batches split over 4 host-platform devices: the same predictions."""
  images, _ = synthetic_batch(10, seed=6)
  one = predict.Predictor.from_workdir(workdir, mc_samples=4,
                                       batch_size=8).predict(images)
  code = (
      'import jax, sys, numpy as np\n'
      'sys.path.insert(0, %r)\n'
      'from conftest import synthetic_batch\n'
      'from gender_jax import predict\n'
      'assert jax.local_device_count() == 4\n'
      'p = predict.Predictor.from_workdir(%r, mc_samples=4, batch_size=8)\n'
      'out = p.predict(synthetic_batch(10, seed=6)[0])\n'
      'np.save(sys.stdout.buffer, np.stack([out[k] for k in sorted(out)]))\n'
  ) % (os.path.dirname(__file__), workdir)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  raw = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                       capture_output=True).stdout
  four = np.load(io.BytesIO(raw))
  np.testing.assert_allclose(four, np.stack([one[k] for k in sorted(one)]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('tta', predict.TTA_MODES)
def test_mc_samples_share_one_convolutional_trunk(tiny_config, image_size,
                                                  tta):
  """16 MC samples cost far less than 16 passes: the trunk runs once (per
  view with flip TTA, which costs about twice one view)."""
  model = models.create_model(tiny_config())
  variables = models.init_variables(model, jax.random.key(0), image_size)
  x = np.zeros((8, *image_size, 3), np.uint8)
  ids = np.zeros(8, np.uint32)

  def flops(mc_samples, tta):
    fn = predict.make_predict_fn(model, mc_samples, tta=tta)
    cost = fn.lower(variables, x, ids).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  assert flops(16, tta) < 1.5 * flops(1, tta)
  if tta == 'flip':
    assert flops(1, 'flip') < 2.2 * flops(1, 'none')
