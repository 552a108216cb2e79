"""Evaluate a trained model on a whole split: report, pictures, TensorBoard.

`evaluate` runs the model over every example of a split exactly once (the
input pipeline pads the last batch and masks the padding) and writes, into
`<workdir>/eval_<split>/`:

  report.json              accuracy, per-class precision/recall/F1/support,
                           macro/weighted F1, confusion matrix, ROC AUC, log
                           loss, expected calibration error (+ its bins)
  confusion_matrix.png
  reliability_diagram.png  accuracy vs confidence per bin, with counts
  wrong_predictions.png    misclassified faces, largest errors first, with
  wrong_predictions_<k>.png  true label and p(male); capped and paged
  events.out.tfevents.*    the scalars and pictures for TensorBoard

`classification_report` computes every number from arrays (numpy only, float64)
so it can be checked against an independent computation. The metrics are a
few lines of numpy each rather than clu.metrics because they need the whole
prediction set (ranks for ROC AUC, bins for calibration), not running means.
"""

import heapq
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import logging

from gender_jax import checkpointing
from gender_jax import dataset
from gender_jax import input_pipeline
from gender_jax import models
from gender_jax import plots
from gender_jax import predict
from gender_jax import sharding as sharding_lib

CLASS_NAMES = dataset.CLASS_NAMES          # ('female', 'male'); male = 1.
NUM_BINS = 10                              # Calibration bins over [0.5, 1].
MAX_WRONG = 120                            # Capped: 4 pages at most.


# ----------------------------------------------------------------- metrics --


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
  """Area under the ROC curve (Mann-Whitney U, ties count half).

  None when only one class is present (the AUC is undefined).
  """
  labels = np.asarray(labels).astype(bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return None
  scores = np.asarray(scores, np.float64)
  order = np.argsort(scores, kind='mergesort')
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based rank within each group of tied scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
  """Mean binary cross-entropy (nats), from logits so it never overflows."""
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  return float(np.mean(np.logaddexp(0.0, z) - y * z))


def calibration_bins(labels: np.ndarray, p_male: np.ndarray,
                     num_bins: int = NUM_BINS) -> List[dict]:
  """Top-label calibration: examples binned by confidence max(p, 1-p).

  `num_bins` equal-width bins over [0.5, 1] (a binary classifier's confidence
  is never below 0.5); bin i is [lower, upper), the last one includes 1.
  Each bin: lower, upper, count, accuracy and mean confidence (None if
  empty).
  """
  p = np.asarray(p_male, np.float64)
  labels = np.asarray(labels)
  predicted = (p >= 0.5).astype(labels.dtype)
  confidence = np.where(predicted == 1, p, 1.0 - p)
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  index = np.clip(np.searchsorted(edges, confidence, side='right') - 1, 0,
                  num_bins - 1)
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
  """sum_b n_b / N * |accuracy_b - confidence_b| over non-empty bins."""
  total = sum(b['count'] for b in bins)
  return float(sum(b['count'] / total * abs(b['accuracy'] - b['confidence'])
                   for b in bins if b['count'])) if total else float('nan')


def classification_report(labels, logits, num_bins: int = NUM_BINS) -> dict:
  """Every reported number for binary labels (male = 1) and logits.

  Predicted male when sigmoid(logit) >= 0.5, as in training. Precision of a
  class never predicted is 0 (sklearn's zero_division=0).
  """
  labels = np.asarray(labels).astype(np.int64)
  logits = np.asarray(logits, np.float64)
  if labels.shape != logits.shape or labels.ndim != 1:
    raise ValueError(f'labels {labels.shape} and logits {logits.shape} must be '
                     'equal-length vectors')
  p_male = np.exp(-np.logaddexp(0.0, -logits))     # sigmoid, no overflow.
  predicted = (p_male >= 0.5).astype(np.int64)
  n = len(labels)
  cm = np.zeros((2, 2), np.int64)            # rows: true, columns: predicted.
  np.add.at(cm, (labels, predicted), 1)
  per_class = {}
  for c, name in enumerate(CLASS_NAMES):
    tp, support, n_pred = cm[c, c], cm[c].sum(), cm[:, c].sum()
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / support if support else 0.0
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall else 0.0)
    per_class[name] = {'precision': float(precision), 'recall': float(recall),
                       'f1': float(f1), 'support': int(support)}
  f1s = np.asarray([per_class[c]['f1'] for c in CLASS_NAMES])
  supports = np.asarray([per_class[c]['support'] for c in CLASS_NAMES])
  bins = calibration_bins(labels, p_male, num_bins)
  return {
      'num_examples': int(n),
      'accuracy': float(np.trace(cm) / n) if n else float('nan'),
      'per_class': per_class,
      'macro_f1': float(f1s.mean()),
      'weighted_f1': float((f1s * supports).sum() / n) if n else float('nan'),
      'confusion_matrix': cm.tolist(),
      'roc_auc': roc_auc(labels, logits),
      'log_loss': log_loss(labels, logits) if n else float('nan'),
      'ece': expected_calibration_error(bins),
      'calibration_bins': bins,
  }


def scalar_metrics(report: dict) -> Dict[str, float]:
  """The report's scalars, flat (for TensorBoard)."""
  out = {k: report[k] for k in ('accuracy', 'macro_f1', 'weighted_f1',
                                'log_loss', 'ece')}
  if report['roc_auc'] is not None:
    out['roc_auc'] = report['roc_auc']
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
  lines += ['confusion matrix (rows: true, columns: predicted)',
            f"{'':>14}{CLASS_NAMES[0]:>10}{CLASS_NAMES[1]:>10}"]
  lines += [f'{name:>14}{row[0]:>10d}{row[1]:>10d}'
            for name, row in zip(CLASS_NAMES, cm)]
  auc = report['roc_auc']
  lines += ['', f"ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}   "
            f"log loss {report['log_loss']:.4f}   ECE {report['ece']:.4f}"]
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

  def sorted(self):
    """(images, labels, p_male), largest error first (ties: earlier first)."""
    items = sorted(self._heap, key=lambda t: t[:2], reverse=True)
    return ([t[2] for t in items], np.asarray([t[3] for t in items]),
            np.asarray([t[4] for t in items]))


def _to_host(x) -> np.ndarray:
  """A global jax.Array as one numpy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(config, builder, mesh, model, variables, split: str,
                  max_wrong: int = MAX_WRONG):
  """(labels, logits, worst errors) over every example of `split` once."""
  fn = predict.make_predict_fn(model, mc_samples=1, mesh=mesh)
  variables = jax.device_put(variables, sharding_lib.replicated(mesh))
  labels, logits = [], []
  worst = _WorstErrors(max_wrong)
  seen = 0
  ids = None                  # Unused without MC (global zeros, made once).
  for batch in input_pipeline.eval_iterator(config, builder, mesh, split):
    if ids is None:
      ids = jax.numpy.zeros(batch['label'].shape, jax.numpy.uint32,
                            device=sharding_lib.data_sharding(mesh))
    out = fn(variables, batch['image'], ids)
    mask = _to_host(batch['mask'])
    y = _to_host(batch['label'])[mask]
    z = np.asarray(out['logit'])[mask]
    p = np.asarray(out['p_male'])[mask]
    wrong = np.flatnonzero((p >= 0.5) != (y == 1))
    if len(wrong):
      images = _to_host(batch['image'])[mask]
      for i in wrong:
        worst.add(seen + int(i), images[i], int(y[i]), float(p[i]))
    seen += len(y)
    labels.append(y)
    logits.append(z)
  return np.concatenate(labels), np.concatenate(logits), worst


def load_variables(workdir: str, config, mesh, checkpoint: str = 'best'):
  """({'params','batch_stats'}, meta) of the 'best' or 'latest' checkpoint."""
  if checkpoint == 'best':
    return checkpointing.restore_best(workdir, config,
                                      sharding_lib.replicated(mesh))
  if checkpoint != 'latest':
    raise ValueError(f"checkpoint={checkpoint!r}: expected 'best' or 'latest'.")
  from gender_jax import train  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    restored = ckpt.restore_latest(
        train.abstract_state(config, models.create_model(config), mesh))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints.')
  state, loop = restored
  return ({'params': state.params, 'batch_stats': state.batch_stats},
          {'step': int(state.step), **loop})


def evaluate(workdir: str, data_dir: Optional[str] = None,
             split: str = 'test', *, checkpoint: str = 'best',
             batch_size: Optional[int] = None, max_wrong: int = MAX_WRONG,
             output_dir: Optional[str] = None, mesh=None) -> dict:
  """Evaluates a workdir's model on `split`; writes report + pictures.

  Args:
    workdir: a training workdir.
    data_dir: TFDS data_dir (default: the one in the workdir's config).
    split: any split of the dataset ('test', 'validation', 'train[:10%]').
    checkpoint: 'best' (default) or 'latest'.
    batch_size: eval batch size (default: config.eval_batch_size).
    max_wrong: most misclassified faces to draw (largest errors).
    output_dir: default `<workdir>/eval_<split>`.
    mesh: default `sharding.make_mesh()`.

  Returns:
    The report (also in report.json), plus 'output_dir', 'files' and the
    checkpoint 'meta'.
  """
  config = checkpointing.read_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  if batch_size:
    config.eval_batch_size = batch_size
  config.eval_steps = None                  # Exact: the whole split.
  mesh = mesh or sharding_lib.make_mesh()
  builder = dataset.load_builder(config.data_dir, config.dataset)
  expected = input_pipeline.num_examples(builder, split)
  variables, meta = load_variables(workdir, config, mesh, checkpoint)
  model = models.create_model(config)
  labels, logits, worst = predict_split(config, builder, mesh, model,
                                        variables, split, max_wrong)
  if len(labels) != expected:
    raise RuntimeError(f'evaluated {len(labels)} examples of {split!r}, but '
                       f'the split has {expected}.')
  report = classification_report(labels, logits)
  report.update(split=split, checkpoint=checkpoint,
                step=int(meta.get('step', 0)), epoch=meta.get('epoch'),
                num_wrong=worst.count)
  output_dir = output_dir or os.path.join(workdir, f'eval_{_slug(split)}')
  files = {}
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
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
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = {'report': os.path.join(output_dir, 'report.json'),
           'confusion_matrix': os.path.join(output_dir, 'confusion_matrix.png'),
           'reliability_diagram': os.path.join(output_dir,
                                               'reliability_diagram.png')}
  plots.plot_confusion_matrix(report['confusion_matrix'], CLASS_NAMES,
                              files['confusion_matrix'])
  plots.plot_reliability_diagram(report['calibration_bins'], report['ece'],
                                 files['reliability_diagram'])
  images, labels, p_male = worst.sorted()
  files['wrong_predictions'] = plots.plot_wrong_predictions(
      images, labels, p_male, CLASS_NAMES, output_dir,
      num_wrong_total=worst.count)
  with open(files['report'], 'w') as f:
    json.dump({**report, 'files': files}, f, indent=2)
  writer = metric_writers.create_default_writer(output_dir,
                                                asynchronous=False)
  step = report['step']
  writer.write_scalars(step, scalar_metrics(report))
  pictures = {k: files[k] for k in ('confusion_matrix', 'reliability_diagram')}
  pictures['wrong_predictions'] = files['wrong_predictions'][0]
  writer.write_images(step, {
      k: np.asarray(Image.open(p).convert('RGB'))[None]
      for k, p in pictures.items()})
  writer.flush()
  writer.close()
  logging.info('Wrote %s', ', '.join(sorted(files)))
  return files
