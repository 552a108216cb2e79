"""The whole pipeline end to end on generated data, in minutes on a CPU.

No face images can ship with the project, so the demo generates a small
synthetic dataset (face-like ellipses; see `gender_jax.synthetic`), then runs
every real step on it: prepare (raw folders -> TFRecord shards -> TFDS),
stage 1, stage 2 from stage 1's best weights, evaluation on the test split,
and MC-Dropout labelling of the raw test folder with a mislabel ranking.
The numbers it prints say nothing about faces.

Rerunning with the same workdir reuses the dataset and resumes every step.
"""

import os
import time

import ml_collections
from absl import logging

from gender_jax import dataset
from gender_jax import evaluate
from gender_jax import label
from gender_jax import prepare_data
from gender_jax import synthetic
from gender_jax import train

SYNTHETIC_NOTICE = (
    'NOTE: this demo runs on SYNTHETIC images (generated ellipses, not faces);'
    ' its accuracy says nothing about real faces. For real data, get the raw '
    'Train|Validation|Test / Male|Female folders (e.g. the public "Gender '
    'Classification Dataset" or CelebA) and run scripts/prepare_data.py, then '
    'scripts/train.py with configs/stage1.py and configs/stage2.py (README.md).')

IMAGE_SIZE = (48, 40)
COUNTS = {'Train': (400, 400), 'Validation': (100, 100), 'Test': (100, 100)}


def demo_config(base: ml_collections.ConfigDict, data_dir: str,
                num_epochs: int) -> ml_collections.ConfigDict:
  """A stage config shrunk to the demo's data: small images, batch and epochs."""
  config = base.copy_and_resolve_references()
  config.data_dir = data_dir
  config.image_size = IMAGE_SIZE
  config.batch_size = 32
  config.eval_batch_size = 100
  config.num_epochs = num_epochs
  config.log_every_steps = 25
  return config


def _print_stage(name: str, summary: dict, workdir: str) -> None:
  """One line per stage: its best epoch and that model's accuracies."""
  final = summary['final_evaluation']
  kept = (' (no epoch beat the stage-1 model it started from: kept it)'
          if summary['best_epoch'] == 0 else '')
  print(f'[{name}] best epoch {summary["best_epoch"]}{kept}: validation '
        f'accuracy {final["validation"]["accuracy"]:.4f}, test accuracy '
        f'{final["test"]["accuracy"]:.4f} -> {workdir}', flush=True)


def run_demo(stage1: ml_collections.ConfigDict,
             stage2: ml_collections.ConfigDict, workdir: str,
             stage1_epochs: int = 4, stage2_epochs: int = 2) -> dict:
  """Runs generate -> prepare -> stage 1 -> stage 2 -> evaluate -> label."""
  print(SYNTHETIC_NOTICE, flush=True)
  start = time.time()
  raw_dir = os.path.join(workdir, 'raw')
  data_dir = os.path.join(workdir, 'tfds')
  if not os.path.isdir(raw_dir):
    synthetic.make_raw_dataset(raw_dir, counts=COUNTS, seed=0)
  if os.path.isdir(dataset.dataset_dir(data_dir)):
    print(f'[prepare] reusing {dataset.dataset_dir(data_dir)}', flush=True)
  else:
    prepared = prepare_data.prepare_raw(raw_dir, data_dir,
                                        image_size=IMAGE_SIZE)
    print(f'[prepare] {prepared.summary()}', flush=True)

  w1, w2 = os.path.join(workdir, 'stage1'), os.path.join(workdir, 'stage2')
  s1 = train.train_and_evaluate(
      demo_config(stage1, data_dir, stage1_epochs), w1)
  _print_stage('stage 1', s1, w1)
  config2 = demo_config(stage2, data_dir, stage2_epochs)
  config2.init_from = w1
  s2 = train.train_and_evaluate(config2, w2)
  _print_stage('stage 2', s2, w2)

  report = evaluate.evaluate(w2, split='test')
  print(evaluate.format_report(report), flush=True)
  print(f'[evaluate] pictures and report.json in {report["output_dir"]}',
        flush=True)

  labels_csv = os.path.join(workdir, 'labels', 'test_labels.csv')
  labelled = label.label_images(w2, os.path.join(raw_dir, 'Test'), labels_csv,
                                mc_samples=10, batch_size=64, progress=False)
  print(f'[label] {labelled["num_files"]} images, MC-Dropout x10 -> '
        f'{labels_csv}', flush=True)
  result = {
      'workdir': workdir,
      'stage1_best_val_accuracy': s1['best_val_accuracy'],
      'stage1_test_accuracy': s1['final_evaluation']['test']['accuracy'],
      'stage2_best_epoch': s2['best_epoch'],
      'stage2_best_val_accuracy': s2['best_val_accuracy'],
      'test_accuracy': report['accuracy'],
      'test_ece': report['ece'],
      'labels_csv': labels_csv,
      'mislabel_candidates': labelled.get('mislabels_csv'),
      'seconds': round(time.time() - start, 1),
  }
  logging.info('demo result: %s', result)
  print(SYNTHETIC_NOTICE, flush=True)
  return result
