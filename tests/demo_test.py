"""The demo's own path at its own size: what it prints shows the recipe working."""

import csv
import os

import pytest

from gender_jax import config_lib
from gender_jax import demo

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'configs', 'default.py')


@pytest.mark.slow
def test_demo_stage2_not_worse_and_mislabels_not_one_class(tmp_path, capsys):
  stage1 = config_lib.load_sibling(CONFIGS, 'stage1.py')
  stage2 = config_lib.load_sibling(CONFIGS, 'stage2.py')
  result = demo.run_demo(stage1, stage2, str(tmp_path))
  assert result['stage2_best_val_accuracy'] >= result[
      'stage1_best_val_accuracy']
  assert result['test_accuracy'] >= result['stage1_test_accuracy']
  assert result['test_accuracy'] >= 0.9
  with open(result['mislabel_candidates'], newline='') as f:
    top = list(csv.DictReader(f))[:20]
  given = {row['given'] for row in top}
  assert given == {'female', 'male'}, top
  printed = capsys.readouterr().out
  assert '[stage 1] best epoch' in printed and '[stage 2] best epoch' in printed
  assert 'SYNTHETIC' in printed
