r"""Side-by-side table of a JAX run and the Keras reference on the same data.

Runs nothing heavy: it reads `<workdir>/results.json` of one or more
`scripts/train.py` runs and, optionally, the output of
`benchmarks/keras_reference.py` (its `key=value` lines), and prints a Markdown
table (validation/test accuracy, training wall time, images/s):

  python benchmarks/keras_reference.py --data_dir=/work/data/gender_faces_112x96 \
      --image_size=112,96 --epochs=8 --batch_size=64 > keras_stage1.log
  python benchmarks/compare_keras.py --workdir=/work/runs/stage1 \
      --workdir=/work/runs/stage2 --keras_log=keras_stage1.log
"""

import argparse
import json
import os
from typing import Dict, List, Optional

RESULTS_FILE = 'results.json'   # gender_jax.train.RESULTS_FILE (no JAX import).


def jax_row(workdir: str) -> Dict[str, str]:
  """One table row from a JAX workdir's results.json."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    raise SystemExit(f'{path} not found: {workdir!r} has no finished run of '
                     'scripts/train.py.')
  with open(path) as f:
    r = json.load(f)
  final = r['final_evaluation']
  history = r['history']
  # Epoch 1 includes compilation; report the steady state when there is one.
  steady = history[1:] or history
  ips = sum(h['images_per_sec'] for h in steady) / len(steady)
  train_s = sum(h['train_seconds'] for h in history)
  return {
      'run': f'JAX {os.path.basename(os.path.normpath(workdir))}',
      'epochs': f"{r['epochs_run']} (best {r['best_epoch']})",
      'val_acc': _pct(final.get('validation', {}).get('accuracy')),
      'test_acc': _pct(final.get('test', {}).get('accuracy')),
      'train_s': f'{train_s:.0f} (+eval {r["train_seconds"] - train_s:.0f})',
      'images_per_s': f'{ips:.0f}',
  }


def keras_row(log_path: str) -> Dict[str, str]:
  """One table row from keras_reference.py's `key=value` output lines."""
  values = {}
  with open(log_path) as f:
    for line in f:
      key, sep, value = line.strip().partition('=')
      if sep and key in ('seconds', 'val_accuracy', 'test_accuracy'):
        values[key] = float(value)
  if 'seconds' not in values:
    raise SystemExit(f'{log_path}: no seconds=... line; pass the output of '
                     'benchmarks/keras_reference.py.')
  return {
      'run': f'Keras ({os.path.basename(log_path)})', 'epochs': '',
      'val_acc': _pct(values.get('val_accuracy')),
      'test_acc': _pct(values.get('test_accuracy')),
      'train_s': f"{values['seconds']:.0f} (fit, incl. val)",
      'images_per_s': '',
  }


def _pct(x: Optional[float]) -> str:
  return '' if x is None else f'{100 * x:.2f}%'


def table(rows: List[Dict[str, str]]) -> str:
  header = ['run', 'epochs', 'val_acc', 'test_acc', 'train_s', 'images_per_s']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row[k] for k in header) + ' |' for row in rows]
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', action='append', default=[],
                      help='A scripts/train.py workdir (repeatable).')
  parser.add_argument('--keras_log', action='append', default=[],
                      help='Output of benchmarks/keras_reference.py '
                      '(repeatable).')
  args = parser.parse_args()
  if not args.workdir and not args.keras_log:
    parser.error('give at least one --workdir or --keras_log')
  rows = [jax_row(w) for w in args.workdir]
  rows += [keras_row(k) for k in args.keras_log]
  print(table(rows))


if __name__ == '__main__':
  main()
