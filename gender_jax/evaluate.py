"""Evaluate a trained model on a whole split: report, pictures, TensorBoard.

`evaluate` runs the model over every example of a split exactly once (the
input pipeline pads the last batch and masks the padding) and writes, into
`<workdir>/eval_<split>/`:

  report.json              accuracy, per-class precision/recall/F1/support,
                           macro/weighted F1, confusion matrix, ROC AUC, log
                           loss, expected calibration error (+ its bins) of
                           p(male) calibrated by the workdir's temperature
                           (log loss and ECE also before it; what ECE a
                           perfectly calibrated model shows on as many
                           examples), accuracy on the most confident 95 /
                           90 / 80% (the rest flagged) and its curve, and
                           what it was computed on: workdir, checkpoint and its
                           step/epoch, data_dir, split, image sizes,
                           temperature, test-time augmentation (tta)
  confusion_matrix.png
  reliability_diagram.png  accuracy vs confidence per bin, with counts
  coverage_accuracy.png    accuracy on the most confident share kept, 5-100%
                           (the rest flagged), the 95/90/80% cuts marked
  wrong_predictions.png    misclassified faces, largest errors first, with
  wrong_predictions_<k>.png  true label and p(male); capped and paged
  events.out.tfevents.*    the scalars and pictures for TensorBoard

`classification_report` computes every number from the whole prediction set
(float64; ranks for ROC AUC, bins for calibration, so not clu's running
means). The pictures are drawn by `gender_jax.plots`.
"""

import functools
import heapq
import os
import re
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import logging
from sklearn import metrics as skm

from gender_jax import calibration
from gender_jax import checkpointing
from gender_jax import dataset
from gender_jax import errors
from gender_jax import fileio
from gender_jax import input_pipeline
from gender_jax import labels as labels_lib
from gender_jax import models
from gender_jax import plots
from gender_jax import predict
from gender_jax import sharding as sharding_lib

NUM_BINS = 10                              # Calibration bins over [0.5, 1].
MAX_WRONG = 120                            # Capped: 4 pages at most.
COVERAGES = (0.95, 0.9, 0.8)               # Shares kept by selective_accuracy.
CURVE_COVERAGES = tuple(i / 20 for i in range(1, 21))   # Its curve: 5%...100%.


# ----------------------------------------------------------------- metrics --


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
  """Mean binary cross-entropy (nats), exact from logits.

  Not `sklearn.metrics.log_loss`: it takes probabilities and clips them at
  float64's epsilon, which caps a confidently wrong prediction at ~36 nats
  (logit 800 is 800 nats here) and rounds saturated sigmoids.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _binned(p_male, num_bins: int):
  """(predicted class, confidence max(p, 1-p), bin edges over [0.5, 1],
  each example's bin index) of `calibration_bins`."""
  p = np.asarray(p_male, np.float64)
  predicted = (p >= 0.5).astype(np.int64)
  confidence = np.where(predicted == 1, p, 1.0 - p)
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  index = np.clip(np.searchsorted(edges, confidence, side='right') - 1, 0,
                  num_bins - 1)
  return predicted, confidence, edges, index


def calibration_bins(labels: np.ndarray, p_male: np.ndarray,
                     num_bins: int = NUM_BINS) -> List[dict]:
  """Top-label calibration: examples binned by confidence max(p, 1-p).

  `num_bins` equal-width bins over [0.5, 1] (a binary classifier's confidence
  is never below 0.5); bin i is [lower, upper), the last one includes 1.
  Each bin: lower, upper, count, accuracy and mean confidence (None if
  empty). Written here because `sklearn.calibration.calibration_curve` bins
  p(male) against the fraction of males over [0, 1] (not the confidence of
  the predicted class against accuracy), drops empty bins and gives no counts.
  """
  labels = np.asarray(labels)
  predicted, confidence, edges, index = _binned(p_male, num_bins)
  predicted = predicted.astype(labels.dtype)
  bins = []
  for i in range(num_bins):
    sel = index == i
    n = int(sel.sum())
    bins.append({
        'lower': float(edges[i]), 'upper': float(edges[i + 1]), 'count': n,
        'accuracy': float((predicted[sel] == labels[sel]).mean()) if n else None,
        'confidence': float(confidence[sel].mean()) if n else None,
    })
  return bins


def expected_calibration_error(bins: Sequence[dict]) -> float:
  """sum_b n_b / N * |accuracy_b - confidence_b| over non-empty bins.

  Written here: sklearn has no expected calibration error.
  """
  total = sum(b['count'] for b in bins)
  return float(sum(b['count'] / total * abs(b['accuracy'] - b['confidence'])
                   for b in bins if b['count'])) if total else float('nan')


def ece_if_calibrated(p_male, num_bins: int = NUM_BINS, draws: int = 200,
                      seed: int = 0) -> Dict[str, float]:
  """{'mean', 'p95'} of the ECE that a perfectly calibrated model with these
  p(male) shows on this many examples (labels drawn from its own p, `draws`
  times): ECE is biased up by sampling, so a measured ECE near 'mean' is
  noise, and only one above 'p95' shows miscalibration.
  """
  _, confidence, _, index = _binned(p_male, num_bins)
  expected = np.bincount(index, confidence, num_bins)
  rng = np.random.default_rng(seed)
  n = len(confidence)
  eces = [np.abs(np.bincount(index, rng.random(n) < confidence,
                             num_bins) - expected).sum() / n
          for _ in range(draws)]
  return {'mean': float(np.mean(eces)),
          'p95': float(np.percentile(eces, 95))}


def selective_accuracy(labels, p_male, coverages: Sequence[float] = COVERAGES,
                       score=None) -> List[dict]:
  """Accuracy on the most confident share of the examples, per coverage.

  What a labeller gets right on the faces it keeps when it flags the rest for
  review. Examples are ranked by `score` (higher is kept first; default the
  confidence max(p, 1-p)). For each coverage c: the score of the
  ceil(c * N)-th example ('threshold': flag below it), and the count and
  accuracy of every example at or above it (ties at the threshold are all
  kept, so 'count' can exceed c * N).
  """
  labels = np.asarray(labels)
  predicted, confidence, _, _ = _binned(p_male, 1)
  score = confidence if score is None else np.asarray(score, np.float64)
  if not len(score) or not np.isfinite(score).all() or not all(
      0 < c <= 1 for c in coverages):
    raise ValueError(f'selective_accuracy needs finite scores ({len(score)} '
                     f'given) and coverages in (0, 1] ({coverages})')
  ranked = np.sort(score)[::-1]
  out = []
  for c in coverages:
    rank = int(np.ceil(round(c * len(ranked), 9)))   # 0.7 * 10 is 7.0...01.
    threshold = ranked[max(rank, 1) - 1]
    kept = score >= threshold
    out.append({'coverage': float(c), 'threshold': float(threshold),
                'count': int(kept.sum()),
                'accuracy': float((predicted[kept] == labels[kept]).mean())})
  return out


def calibration_errors(labels, logits, num_bins: int = NUM_BINS
                       ) -> Dict[str, float]:
  """{'log_loss', 'ece'} of logits: how far p(male) is from the labels'
  frequencies (before and after temperature scaling, in `calibration`)."""
  logits = np.asarray(logits, np.float64)
  bins = calibration_bins(labels, np.exp(-np.logaddexp(0.0, -logits)),
                          num_bins)
  return {'log_loss': log_loss(labels, logits),
          'ece': expected_calibration_error(bins)}


def classification_report(labels, logits, num_bins: int = NUM_BINS) -> dict:
  """Every reported number for binary labels (male = 1) and logits.

  Predicted male when sigmoid(logit) >= 0.5, as in training. Accuracy,
  precision/recall/F1, the confusion matrix and ROC AUC are sklearn's; the
  precision of a class never predicted is 0 (zero_division=0) and ROC AUC is
  None when one class is missing (undefined). Log loss and calibration are
  computed here (see `log_loss`, `calibration_bins`).
  """
  labels = np.asarray(labels).astype(np.int64)
  logits = np.asarray(logits, np.float64)
  if labels.shape != logits.shape or labels.ndim != 1 or not len(labels):
    raise ValueError(f'labels {labels.shape} and logits {logits.shape} must be '
                     'equal-length, non-empty vectors')
  p_male = np.exp(-np.logaddexp(0.0, -logits))     # sigmoid, no overflow.
  predicted = (p_male >= 0.5).astype(np.int64)
  classes = list(range(len(labels_lib.CLASS_NAMES)))
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, predicted, labels=classes, zero_division=0.0)
  per_class = {
      name: {'precision': float(precision[c]), 'recall': float(recall[c]),
             'f1': float(f1[c]), 'support': int(support[c])}
      for c, name in enumerate(labels_lib.CLASS_NAMES)}
  bins = calibration_bins(labels, p_male, num_bins)
  return {
      'num_examples': len(labels),
      'accuracy': float(skm.accuracy_score(labels, predicted)),
      'per_class': per_class,
      'macro_f1': float(np.mean(f1)),
      'weighted_f1': float(np.average(f1, weights=support)),
      'confusion_matrix': skm.confusion_matrix(labels, predicted,
                                               labels=classes).tolist(),
      'roc_auc': (float(skm.roc_auc_score(labels, logits))
                  if len(np.unique(labels)) == 2 else None),
      'log_loss': log_loss(labels, logits),
      'ece': expected_calibration_error(bins),
      'ece_if_calibrated': ece_if_calibrated(p_male, num_bins),
      'calibration_bins': bins,
      'selective_accuracy': selective_accuracy(labels, p_male),
      'coverage_curve': selective_accuracy(labels, p_male, CURVE_COVERAGES),
  }


def scalar_metrics(report: dict) -> Dict[str, float]:
  """The report's scalars, flat (for TensorBoard)."""
  out = {k: report[k] for k in ('accuracy', 'macro_f1', 'weighted_f1',
                                'log_loss', 'ece', 'log_loss_uncalibrated',
                                'ece_uncalibrated') if k in report}
  if report['roc_auc'] is not None:
    out['roc_auc'] = report['roc_auc']
  for kept in report['selective_accuracy']:
    out[f"accuracy_most_confident_{round(kept['coverage'] * 100)}"] = (
        kept['accuracy'])
  for name, values in report['per_class'].items():
    for k in ('precision', 'recall', 'f1'):
      out[f'{name}_{k}'] = values[k]
  return out


def format_report(report: dict) -> str:
  """The report as a text table (sklearn classification_report style)."""
  lines = [f"{'':>14}{'precision':>10}{'recall':>10}{'f1-score':>10}"
           f"{'support':>10}"]
  for name, v in report['per_class'].items():
    lines.append(f"{name:>14}{v['precision']:>10.4f}{v['recall']:>10.4f}"
                 f"{v['f1']:>10.4f}{v['support']:>10d}")
  n = report['num_examples']
  lines += ['',
            f"{'accuracy':>14}{'':>20}{report['accuracy']:>10.4f}{n:>10d}",
            f"{'macro avg':>14}{'':>20}{report['macro_f1']:>10.4f}{n:>10d}",
            f"{'weighted avg':>14}{'':>20}{report['weighted_f1']:>10.4f}"
            f'{n:>10d}', '']
  cm = report['confusion_matrix']
  names = labels_lib.CLASS_NAMES
  lines += ['confusion matrix (rows: true, columns: predicted)',
            f"{'':>14}{names[0]:>10}{names[1]:>10}"]
  lines += [f'{name:>14}{row[0]:>10d}{row[1]:>10d}'
            for name, row in zip(names, cm)]
  auc = report['roc_auc']
  lines += ['', f"ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}   "
            f"log loss {report['log_loss']:.4f}   ECE {report['ece']:.4f}"]
  noise = report['ece_if_calibrated']
  lines.append(f"ECE of a perfectly calibrated model on {n} examples: "
               f"mean {noise['mean']:.4f}, 95th percentile {noise['p95']:.4f}")
  kept = report['selective_accuracy']
  lines.append('accuracy on the most confident '
               + ' / '.join(f"{k['coverage']:.0%}" for k in kept) + ': '
               + ' / '.join(f"{k['accuracy']:.4f}" for k in kept)
               + ' (the rest flagged: confidence below '
               + ' / '.join(f"{np.floor(k['threshold'] * 1e4) / 1e4:.4f}"
                            for k in kept) + ')')
  if 'temperature' in report:
    lines.append(f"temperature {report['temperature']:.4f}; uncalibrated: "
                 f"log loss {report['log_loss_uncalibrated']:.4f}   "
                 f"ECE {report['ece_uncalibrated']:.4f}")
  return '\n'.join(lines)


# --------------------------------------------------------------- evaluation --


class _WorstErrors:
  """Keeps the `capacity` misclassified examples with the largest errors."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.count = 0
    self._heap = []       # (error, -index, image, label, p) min-heap.

  def add(self, index: int, image, label: int, p: float) -> None:
    self.count += 1
    error = abs(label - p)
    item = (error, -index, image, label, p)
    if len(self._heap) < self.capacity:
      heapq.heappush(self._heap, item)
    elif self.capacity and item[:2] > self._heap[0][:2]:
      heapq.heapreplace(self._heap, item)

  def add_batch(self, first_index: int, labels, p_male, images) -> None:
    """Adds a batch's misclassified examples; `images()` gives its images,
    read (from the devices) only when some may be kept."""
    wrong = np.flatnonzero((p_male >= 0.5) != (labels == 1))
    if not self.capacity:
      self.count += len(wrong)
      return
    host_images = images() if len(wrong) else None
    for i in wrong:
      self.add(first_index + int(i), host_images[i], int(labels[i]),
               float(p_male[i]))

  def sorted(self):
    """(images, labels, p_male), largest error first (ties: earlier first)."""
    items = sorted(self._heap, key=lambda t: t[:2], reverse=True)
    return ([t[2] for t in items], np.asarray([t[3] for t in items]),
            np.asarray([t[4] for t in items]))


def _to_host(x, rows=None) -> np.ndarray:
  """A global jax.Array as one numpy array on every process; only its `rows`
  (a boolean mask) if given."""
  if x.is_fully_addressable or x.is_fully_replicated:
    host = np.asarray(x)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    host = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return host if rows is None else host[rows]


def predict_split(config, builder, mesh, predict_fn, variables, split: str,
                  max_wrong: int = MAX_WRONG):
  """(labels, logits, worst errors) over every example of `split` once, or
  the batches of its `config.eval_steps` cap: the one evaluation loop, of
  training (validation, final evaluation) and of `evaluate`.

  `predict_fn` is a deterministic `predict.make_predict_fn(model, mesh=mesh,
  ...)`, made once by a caller that runs several splits or checkpoints (a
  new one compiles again). Every process runs it and gets all the results.
  """
  variables = jax.device_put(variables, sharding_lib.replicated(mesh))
  labels, logits = [], []
  worst = _WorstErrors(max_wrong)
  ids = None                  # Unused without MC (global zeros, made once).

  def collect(batch, out, start: int) -> int:
    """Reads a finished batch's real examples; returns how many."""
    mask = _to_host(batch['mask'])
    labels.append(_to_host(batch['label'], mask))
    logits.append(_to_host(out['logit'], mask))
    worst.add_batch(start, labels[-1], _to_host(out['p_male'], mask),
                    functools.partial(_to_host, batch['image'], mask))
    return len(labels[-1])

  seen, in_flight = 0, None   # The next batch runs while this one is read.
  for batch in input_pipeline.eval_iterator(config, builder, mesh, split):
    if ids is None:
      ids = jax.numpy.zeros(batch['label'].shape, jax.numpy.uint32,
                            device=sharding_lib.data_sharding(mesh))
    out = predict_fn(variables, batch['image'], ids)
    if in_flight is not None:
      seen += collect(*in_flight, seen)
    in_flight = batch, out
  if in_flight is not None:
    seen += collect(*in_flight, seen)
  expected = input_pipeline.num_examples(builder, split)
  if not seen or seen > expected or (seen < expected and not config.eval_steps):
    raise RuntimeError(f'evaluated {seen} examples of {split!r}, but the '
                       f'split has {expected}.')
  return np.concatenate(labels), np.concatenate(logits), worst


def load_variables(workdir: str, config, mesh, checkpoint: str = 'best'):
  """({'params','batch_stats'}, meta) of the 'best' or 'latest' checkpoint,
  replicated over `mesh`; meta has the checkpoint's step and epoch."""
  replicated = sharding_lib.replicated(mesh)
  if checkpoint == 'best':
    return checkpointing.restore_best(workdir, config, replicated)
  if checkpoint == 'latest':
    return checkpointing.restore_latest_variables(workdir, config, replicated)
  raise ValueError(f"checkpoint={checkpoint!r}: expected 'best' or 'latest'.")


def open_split(workdir: str, data_dir: Optional[str], split: str,
               batch_size: Optional[int] = None, mesh=None):
  """(config, builder, mesh) to run a workdir's model over all of `split`.

  The config is the workdir's, with `data_dir` and `batch_size` (eval batch)
  if given and no eval_steps cap (exact); mesh defaults to
  `sharding.make_mesh()`.

  Raises:
    FileNotFoundError: no workdir or dataset there.
    errors.UserError: `split` is not in the dataset or has no examples.
  """
  config = checkpointing.read_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  if batch_size:
    config.eval_batch_size = batch_size
  config.eval_steps = None                  # Exact: the whole split.
  mesh = mesh or sharding_lib.make_mesh()
  builder = dataset.load_builder(config.data_dir, config.dataset)
  try:
    expected = input_pipeline.num_examples(builder, split)
  except (errors.UserError, ValueError) as e:  # Unknown split or bad slice.
    raise errors.UserError(f'--split={split!r}: {e}') from e
  if not expected:
    raise errors.UserError(f'--split={split!r} has no examples in '
                        f'{builder.data_dir}.')
  return config, builder, mesh


def evaluate(workdir: str, data_dir: Optional[str] = None,
             split: str = 'test', *, checkpoint: str = 'best',
             batch_size: Optional[int] = None, max_wrong: int = MAX_WRONG,
             output_dir: Optional[str] = None, mesh=None,
             tta: str = 'none') -> dict:
  """Evaluates a workdir's model on `split`; writes report + pictures.

  Images stored at another size than the model's are resized (bilinear, as
  in training) with a warning, and the report says so (`resized`). The
  probabilities are calibrated by the workdir's temperature
  (`calibration.read_temperature`, 1 without calibration.json).

  Args:
    workdir: a training workdir.
    data_dir: TFDS data_dir (default: the one in the workdir's config).
    split: any split of the dataset ('test', 'validation', 'train[:10%]').
    checkpoint: 'best' (default) or 'latest'.
    batch_size: eval batch size (default: config.eval_batch_size).
    max_wrong: most misclassified faces to draw (largest errors).
    output_dir: default `<workdir>/eval_<split>`.
    mesh: default `sharding.make_mesh()`.
    tta: 'none', or 'flip' (mean logit of each image and its mirror).

  Returns:
    The report (also in report.json): the metrics of `classification_report`
    of the calibrated logits, ece_uncalibrated and log_loss_uncalibrated
    (before the temperature), what they were computed on (workdir,
    checkpoint, step, epoch, data_dir, split, dataset_image_size,
    model_image_size, resized, temperature, tta), num_wrong, and the
    'output_dir' and 'files' written.

  Raises:
    FileNotFoundError: no workdir, dataset or checkpoint there.
    errors.UserError: `split` is not in the dataset or has no examples.
  """
  config, builder, mesh = open_split(workdir, data_dir, split, batch_size,
                                     mesh)
  output_dir = output_dir or os.path.join(workdir, f'eval_{_slug(split)}')
  if jax.process_index() == 0:   # A folder that cannot be made fails first.
    os.makedirs(output_dir, exist_ok=True)
  stored = tuple(input_pipeline.stored_image_size(builder))
  wanted = tuple(config.image_size)
  if stored != wanted and jax.process_index() == 0:
    logging.warning('The dataset at %s stores %dx%d images but the model takes '
                    '%dx%d: evaluating on resized (bilinear) images.',
                    builder.data_dir, *stored, *wanted)
  variables, meta = load_variables(workdir, config, mesh, checkpoint)
  step = int(meta.get('step', 0))
  temperature = calibration.read_temperature(
      workdir, step if checkpoint == 'best' else None)
  predict_fn = predict.make_predict_fn(models.create_model(config), mesh=mesh,
                                       temperature=temperature, tta=tta)
  labels, logits, worst = predict_split(config, builder, mesh, predict_fn,
                                        variables, split, max_wrong)
  report = classification_report(labels, logits)
  uncalibrated = calibration_errors(
      labels, np.asarray(logits, np.float64) * temperature)
  report.update(ece_uncalibrated=uncalibrated['ece'],
                log_loss_uncalibrated=uncalibrated['log_loss'],
                temperature=temperature, tta=tta, workdir=workdir,
                checkpoint=checkpoint, step=step, epoch=meta.get('epoch'),
                data_dir=config.data_dir, split=split,
                dataset_image_size=list(stored), model_image_size=list(wanted),
                resized=stored != wanted, num_wrong=worst.count)
  files = {}
  if jax.process_index() == 0:
    files = _write_outputs(report, worst, output_dir)
  report['files'] = files
  report['output_dir'] = output_dir
  return report


def _slug(split: str) -> str:
  """'test' -> 'test', 'train[:10%]' -> 'train_10pct' (a folder name)."""
  return re.sub(r'[^A-Za-z0-9]+', '_', split.replace('%', 'pct')).strip('_')


def _write_outputs(report: dict, worst: _WorstErrors, output_dir: str):
  """report.json, the PNGs and TensorBoard events (host 0)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  images, labels, p_male = worst.sorted()
  wrong = plots.wrong_prediction_pages(images, labels, p_male,
                                       labels_lib.CLASS_NAMES,
                                       num_wrong_total=worst.count)
  pictures = {
      'confusion_matrix': plots.confusion_matrix(report['confusion_matrix'],
                                                 labels_lib.CLASS_NAMES),
      'reliability_diagram': plots.reliability_diagram(
          report['calibration_bins'], report['ece']),
      'coverage_accuracy': plots.coverage_accuracy(
          report['coverage_curve'], report['selective_accuracy'],
          report['num_examples']),
      'wrong_predictions': wrong[0]}
  single = ('confusion_matrix', 'reliability_diagram', 'coverage_accuracy')
  files = {'report': os.path.join(output_dir, 'report.json'),
           **{k: os.path.join(output_dir, f'{k}.png') for k in single},
           'wrong_predictions': plots.wrong_page_paths(output_dir, len(wrong))}
  for k in single:
    plots.write_png(pictures[k], files[k])
  for page, path in zip(wrong, files['wrong_predictions']):
    plots.write_png(page, path)
  fileio.write_json(files['report'], {**report, 'files': files})
  writer = metric_writers.create_default_writer(output_dir,
                                                asynchronous=False)
  step = report['step']
  writer.write_scalars(step, scalar_metrics(report))
  writer.write_images(step, {k: v[None] for k, v in pictures.items()})
  writer.flush()
  writer.close()
  logging.info('Wrote %s', ', '.join(sorted(files)))
  return files
