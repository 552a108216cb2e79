"""Tests for gender_jax.evaluate: metrics, exact split coverage, report, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image
from sklearn import metrics as skm

from gender_jax import checkpointing
from gender_jax import dataset
from gender_jax import errors
from gender_jax import evaluate
from gender_jax import predict
from gender_jax import sharding
from gender_jax import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNTS = {'Train': (6, 6), 'Validation': (5, 5), 'Test': (19, 18)}


def random_predictions(n=500, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  logits = rng.normal(0, 2, n) + 1.5 * (2 * labels - 1)
  logits[:20] = np.round(logits[:20])          # Some tied scores.
  return labels, logits


def numpy_ece(labels, p, num_bins):
  """ECE written out independently: loop over examples."""
  sums = np.zeros((num_bins, 3))                    # count, correct, conf.
  for y, q in zip(labels, p):
    pred = int(q >= 0.5)
    conf = q if pred else 1 - q
    b = min(int((conf - 0.5) / (0.5 / num_bins)), num_bins - 1)
    sums[b] += (1, pred == y, conf)
  full = sums[:, 0] > 0
  acc = sums[full, 1] / sums[full, 0]
  conf = sums[full, 2] / sums[full, 0]
  return float((sums[full, 0] / len(labels) * np.abs(acc - conf)).sum())


def test_report_equals_sklearn_and_numpy():
  labels, logits = random_predictions()
  r = evaluate.classification_report(labels, logits)
  p = 1 / (1 + np.exp(-logits))
  pred = (p >= 0.5).astype(int)
  assert r['num_examples'] == 500
  assert r['accuracy'] == pytest.approx(skm.accuracy_score(labels, pred))
  prec, rec, f1, sup = skm.precision_recall_fscore_support(labels, pred)
  for c, name in enumerate(('female', 'male')):
    assert r['per_class'][name]['precision'] == pytest.approx(prec[c])
    assert r['per_class'][name]['recall'] == pytest.approx(rec[c])
    assert r['per_class'][name]['f1'] == pytest.approx(f1[c])
    assert r['per_class'][name]['support'] == sup[c]
  assert r['macro_f1'] == pytest.approx(skm.f1_score(labels, pred,
                                                     average='macro'))
  assert r['weighted_f1'] == pytest.approx(skm.f1_score(labels, pred,
                                                        average='weighted'))
  assert r['confusion_matrix'] == skm.confusion_matrix(labels, pred).tolist()
  assert r['roc_auc'] == pytest.approx(skm.roc_auc_score(labels, logits))
  assert r['log_loss'] == pytest.approx(skm.log_loss(labels, p), rel=1e-9)
  assert r['ece'] == pytest.approx(numpy_ece(labels, p, evaluate.NUM_BINS))
  assert sum(b['count'] for b in r['calibration_bins']) == 500
  table = evaluate.format_report(r)
  assert 'macro avg' in table and f"{r['accuracy']:.4f}" in table


def test_ece_if_calibrated_is_the_sampling_noise_of_ece():
  # Every p = 0.9: the ECE of n labels drawn from p is |k/n - 0.9|, k ~
  # Binomial(n, 0.9), whose mean is ~sd * sqrt(2 / pi) (normal limit).
  for n in (1000, 4000):
    noise = evaluate.ece_if_calibrated(np.full(n, 0.9), draws=4000)
    sd = np.sqrt(0.9 * 0.1 / n)
    assert noise['mean'] == pytest.approx(sd * np.sqrt(2 / np.pi), rel=0.05)
    assert noise['p95'] == pytest.approx(1.96 * sd, rel=0.1)
  # Confidences are symmetric in p: p and 1 - p give the same noise.
  p = np.random.default_rng(0).uniform(0, 1, 500)
  assert (evaluate.ece_if_calibrated(p) == evaluate.ece_if_calibrated(1 - p))
  r = evaluate.classification_report(np.ones(500, int), np.log(p / (1 - p)))
  assert r['ece_if_calibrated'] == pytest.approx(evaluate.ece_if_calibrated(p),
                                                rel=1e-3)
  assert 'perfectly calibrated model on 500 examples' in (
      evaluate.format_report(r))


def test_selective_accuracy_keeps_the_most_confident():
  # Ten examples, confidence falling 0.99 ... 0.55; the 2nd and the last two
  # are wrong. p(male) alternates sides, so confidence is max(p, 1 - p).
  conf = np.array([.99, .95, .9, .85, .8, .75, .7, .65, .6, .55])
  labels = np.arange(10) % 2
  p = np.where(labels == 1, conf, 1 - conf)
  p[[1, 8, 9]] = 1 - p[[1, 8, 9]]
  kept = evaluate.selective_accuracy(labels, p, coverages=(1.0, 0.8, 0.75,
                                                           0.7, 0.1))
  assert [k['count'] for k in kept] == [10, 8, 8, 7, 1]
  assert [k['accuracy'] for k in kept] == [0.7, 7 / 8, 7 / 8, 6 / 7, 1.0]
  assert [k['threshold'] for k in kept] == pytest.approx(
      [.55, .65, .65, .7, .99])
  # Ranked by another score (higher kept first): the least confident first.
  kept = evaluate.selective_accuracy(labels, p, coverages=(0.3,), score=-conf)
  assert kept[0] == {'coverage': 0.3, 'threshold': -.65, 'count': 3,
                     'accuracy': 1 / 3}
  # Ties at the threshold are all kept: then more than c * N examples.
  kept = evaluate.selective_accuracy(np.ones(4, int), [.9, .8, .8, .6],
                                     coverages=(0.5,))
  assert kept[0]['count'] == 3 and kept[0]['threshold'] == 0.8
  for bad in (dict(labels=[], p_male=[]), dict(coverages=(0.0,)),
              dict(coverages=(1.5,)), dict(score=[np.nan] + [0.0] * 9)):
    args = dict(labels=labels, p_male=p, coverages=(0.5,)) | bad
    with pytest.raises(ValueError, match='finite scores'):
      evaluate.selective_accuracy(**args)
  # In the report, its scalars and its text.
  labels, logits = random_predictions()
  r = evaluate.classification_report(labels, logits)
  assert [k['coverage'] for k in r['selective_accuracy']] == [0.95, 0.9, 0.8]
  accuracies = [k['accuracy'] for k in r['selective_accuracy']]
  assert r['accuracy'] < accuracies[0] < accuracies[1] < accuracies[2]
  assert evaluate.scalar_metrics(r)['accuracy_most_confident_90'] == (
      accuracies[1])
  assert ('accuracy on the most confident 95% / 90% / 80%: '
          + ' / '.join(f'{a:.4f}' for a in accuracies)) in (
              evaluate.format_report(r))


def test_report_edge_cases():
  # One class only: AUC undefined; a class never predicted has precision 0.
  r = evaluate.classification_report(np.ones(4, int), np.array([3., 2, 1, -1]))
  assert r['roc_auc'] is None
  assert r['per_class']['female']['precision'] == 0.0
  assert r['accuracy'] == 0.75
  # Extreme logits: log loss stays finite and exact.
  r = evaluate.classification_report(np.array([0, 1]), np.array([800., -800.]))
  assert r['log_loss'] == pytest.approx(800.0)
  with pytest.raises(ValueError):
    evaluate.classification_report(np.ones(3), np.ones(2))
  with pytest.raises(ValueError, match='non-empty'):
    evaluate.classification_report(np.ones(0), np.ones(0))
  # One predicted class only: its F1 and the confusion matrix keep both rows.
  r = evaluate.classification_report(np.array([0, 1, 1]), np.array([1., 2, 3]))
  assert r['confusion_matrix'] == [[0, 1], [0, 2]]
  assert r['per_class']['female'] == {'precision': 0.0, 'recall': 0.0,
                                      'f1': 0.0, 'support': 1}
  assert r['weighted_f1'] == pytest.approx(2 / 3 * 0.8)


def test_worst_errors_keeps_largest_first():
  worst = evaluate._WorstErrors(3)
  for i, (y, p) in enumerate([(1, .4), (0, .9), (1, .05), (0, .6), (1, .01)]):
    worst.add(i, np.full((2, 2, 3), i, np.uint8), y, p)
  images, labels, p = worst.sorted()
  assert worst.count == 5
  assert [int(im[0, 0, 0]) for im in images] == [4, 2, 1]
  np.testing.assert_allclose(p, [.01, .05, .9])


@pytest.fixture(scope='module')
def data_and_workdir(tmp_path_factory, make_workdir, image_size):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  synthetic.make_tfds_dataset(data_dir, image_size=image_size, counts=COUNTS)
  workdir = make_workdir(tmp_path_factory.mktemp('w'))
  return data_dir, workdir


@pytest.mark.slow
def test_every_example_counted_once(data_and_workdir):
  data_dir, workdir = data_and_workdir
  config = checkpointing.read_config(workdir)
  config.data_dir = data_dir
  config.eval_batch_size = 16                      # 37 test examples: padded.
  config.eval_steps = None
  mesh = sharding.make_mesh()
  _, model, variables, _ = checkpointing.load_model(workdir)
  builder = dataset.load_builder(data_dir)
  predict_fn = predict.make_predict_fn(model, mesh=mesh)
  labels, logits, _ = evaluate.predict_split(config, builder, mesh,
                                             predict_fn, variables, 'test')
  examples = list(tfds.as_numpy(builder.as_dataset(split='test')))
  images = np.stack([e['images'] for e in examples])
  want_logits = np.asarray(model.apply(variables, images, train=False))
  want_labels = np.asarray([e['label'] for e in examples])
  assert len(labels) == len(examples) == 37
  # Same multiset of (label, logit) pairs as one pass over the split.
  got = sorted(zip(labels.tolist(), np.round(logits, 4).tolist()))
  want = sorted(zip(want_labels.tolist(), np.round(want_logits, 4).tolist()))
  assert got == want
  # Training's eval_steps cap: the first batches only.
  config.eval_steps = 2
  capped, capped_logits, _ = evaluate.predict_split(
      config, builder, mesh, predict_fn, variables, 'test')
  assert len(capped) == 32
  np.testing.assert_array_equal(capped_logits, logits[:32])


def test_evaluate_writes_report_pictures_and_tensorboard(data_and_workdir):
  data_dir, workdir = data_and_workdir
  report = evaluate.evaluate(workdir, data_dir, 'test', batch_size=16,
                             max_wrong=7)
  out = os.path.join(workdir, 'eval_test')
  assert report['output_dir'] == out
  with open(os.path.join(out, 'report.json')) as f:
    saved = json.load(f)
  assert saved['num_examples'] == 37 and saved['split'] == 'test'
  # What it was computed on.
  assert saved['workdir'] == workdir and saved['data_dir'] == data_dir
  assert saved['checkpoint'] == 'best'
  assert (saved['step'], saved['epoch']) == (7, 1)
  assert saved['dataset_image_size'] == saved['model_image_size'] == [24, 20]
  assert saved['resized'] is False
  assert saved['accuracy'] == report['accuracy'] >= 0.8
  assert sum(map(sum, saved['confusion_matrix'])) == 37
  assert [k['coverage'] for k in saved['coverage_curve']] == list(
      evaluate.CURVE_COVERAGES)
  assert saved['coverage_curve'][-1]['accuracy'] == saved['accuracy']
  for name in ('confusion_matrix.png', 'reliability_diagram.png',
               'coverage_accuracy.png', 'wrong_predictions.png'):
    with Image.open(os.path.join(out, name)) as im:
      im.verify()
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(out))
  # Another split, its own folder.
  val = evaluate.evaluate(workdir, data_dir, 'validation')
  assert val['num_examples'] == 10
  assert os.path.exists(os.path.join(workdir, 'eval_validation',
                                     'report.json'))


def test_latest_checkpoint_and_split_slices(data_and_workdir, tmp_path,
                                            make_workdir, trained_variables,
                                            monkeypatch):
  from gender_jax import models, steps  # pylint: disable=g-import-not-at-top
  data_dir, best_workdir = data_and_workdir
  workdir = make_workdir(tmp_path)
  config = checkpointing.read_config(workdir)
  state = steps.create_train_state(config, models.create_model(config),
                                   trained_variables).replace(step=5)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save_latest(5, state, {'epoch': 0})
  ckpt.close()
  # Only params and batch_stats are read: no optimizer, no gender_jax.steps.
  import gender_jax  # pylint: disable=g-import-not-at-top
  with monkeypatch.context() as m:
    for name in ('steps', 'train'):
      m.delattr(gender_jax, name, raising=False)
      m.setitem(sys.modules, f'gender_jax.{name}', None)
    latest = evaluate.evaluate(workdir, data_dir, 'test', checkpoint='latest')
  best = evaluate.evaluate(best_workdir, data_dir, 'test')
  assert latest['step'] == 5 and latest['epoch'] == 0
  assert latest['checkpoint'] == 'latest'
  assert latest['log_loss'] == pytest.approx(best['log_loss'], rel=1e-5)
  half = evaluate.evaluate(workdir, data_dir, 'test[:50%]')
  assert half['output_dir'].endswith('eval_test_50pct')
  want = dataset.load_builder(data_dir).info.splits['test[:50%]'].num_examples
  assert half['num_examples'] == want and 15 < want < 22


@pytest.mark.slow
@pytest.mark.multiprocess
def test_same_report_on_four_devices(data_and_workdir, tmp_path):
  """Sharded over 4 (host-platform) devices: the same numbers as on one."""
  data_dir, workdir = data_and_workdir
  one = evaluate.evaluate(workdir, data_dir, 'test', batch_size=16,
                          output_dir=str(tmp_path / 'one'))
  code = (
      'import jax, json\n'
      'from gender_jax import evaluate\n'
      'assert jax.device_count() == 4\n'
      f'r = evaluate.evaluate({workdir!r}, {data_dir!r}, "test", '
      f'batch_size=16, output_dir={str(tmp_path / "four")!r})\n'
      'print(json.dumps(r["confusion_matrix"]), r["log_loss"])\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                       capture_output=True, text=True).stdout.split('\n')[-2]
  cm, loss = out.rsplit(' ', 1)
  assert json.loads(cm) == one['confusion_matrix']
  assert float(loss) == pytest.approx(one['log_loss'], rel=1e-5)


def test_other_image_size_is_resized_with_a_warning(data_and_workdir,
                                                   tmp_path, monkeypatch):
  _, workdir = data_and_workdir
  data_dir = str(tmp_path / 'tfds')
  synthetic.make_tfds_dataset(data_dir, image_size=(30, 26),
                              counts={'Train': (1, 1), 'Validation': (1, 1),
                                      'Test': (3, 3)})
  warnings = []
  monkeypatch.setattr(logging, 'warning',
                      lambda msg, *args: warnings.append(msg % args))
  report = evaluate.evaluate(workdir, data_dir, 'test',
                             output_dir=str(tmp_path / 'out'))
  assert report['num_examples'] == 6
  assert report['dataset_image_size'] == [30, 26]
  assert report['model_image_size'] == [24, 20]
  assert report['resized'] is True
  assert [w for w in warnings if '30x26' in w and '24x20' in w], warnings
  with open(tmp_path / 'out' / 'report.json') as f:
    assert json.load(f)['resized'] is True


def test_user_mistakes_are_user_errors(data_and_workdir, tmp_path):
  data_dir, workdir = data_and_workdir
  with pytest.raises(errors.UserError, match="'nosuch'.*'test'"):
    evaluate.evaluate(workdir, data_dir, 'nosuch')
  with pytest.raises(errors.UserError, match='no examples'):
    evaluate.evaluate(workdir, data_dir, 'test[:0]')
  with pytest.raises(FileNotFoundError, match='not a gender_jax workdir'):
    evaluate.evaluate(str(tmp_path / 'none'), data_dir)
  with pytest.raises(FileNotFoundError, match='No TFDS dataset'):
    evaluate.evaluate(workdir, str(tmp_path / 'none'))
  with pytest.raises(FileNotFoundError, match='No train-state checkpoint'):
    evaluate.evaluate(workdir, data_dir, checkpoint='latest')


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize('args,message', [
    (['--workdir=/nonexistent/w'], 'not a gender_jax workdir'),
    (['--workdir=w', '--checkpoint=worst'], 'should be one of <best|latest>'),
])
def test_script_user_mistake_is_one_line_and_status_2(args, message):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'evaluate.py'), *args],
      capture_output=True, text=True, cwd=REPO, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = out.stderr.splitlines()
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith('evaluate.py: error: ') and message in lines[0]
  assert 'Traceback' not in out.stderr
