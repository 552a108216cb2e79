"""Tests of gender_jax.train: the epoch loop end to end, resume, errors."""

import glob
import json
import os
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from gender_jax import calibration
from gender_jax import callbacks
from gender_jax import checkpointing
from gender_jax import errors
from gender_jax import evaluate
from gender_jax import input_pipeline
from gender_jax import models
from gender_jax import sharding
from gender_jax import steps
from gender_jax import synthetic
from gender_jax import train
from checkpointing_test import damage
from conftest import tiny_train_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs', 'default.py')


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module (and its subprocesses).

  The end-to-end tests build the same tiny steps several times; compiling
  dominates their run time.
  """
  path = str(tmp_path_factory.mktemp('jax_cache'))
  saved = {k: getattr(jax.config, k) for k in (
      'jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_min_entry_size_bytes')}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield path
  for key, value in saved.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def cache_env(path):
  """Environment for a subprocess sharing the compilation cache at `path`."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'JAX_COMPILATION_CACHE_DIR': path,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  synthetic.make_tfds_dataset(str(root), image_size=(24, 20))
  return str(root)


def _params(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  for x, y in zip(_params(a), _params(b), strict=True):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_stage1_then_stage2(data_dir, tmp_path):
  w1, w2 = str(tmp_path / 'w1'), str(tmp_path / 'w2')
  summary = train.train_and_evaluate(tiny_config(data_dir), w1)
  assert summary['epochs_run'] == 2
  assert len(summary['history']) == 2
  assert summary['history'][-1]['step'] == 12
  assert set(summary['final_evaluation']) == {'validation', 'test'}
  assert summary['final_evaluation']['test']['count'] == 40
  assert glob.glob(os.path.join(w1, 'events.out.tfevents.*'))
  assert os.listdir(os.path.join(w1, 'checkpoints'))
  assert os.listdir(os.path.join(w1, 'best'))
  with open(os.path.join(w1, train.RESULTS_FILE)) as f:
    assert json.load(f)['best_epoch'] == summary['best_epoch']
  # config.calibrate: the best model's temperature, fitted on validation.
  assert summary['calibration']['step'] == summary['best_step']
  assert calibration.read_temperature(w1, summary['best_step']) == (
      summary['calibration']['temperature'])
  assert checkpointing.read_config(w1).model == 'tiny'
  # The best model is the one the early-stopping rule chose.
  accs = [h['val_accuracy'] for h in summary['history']]
  best_epoch = max(range(len(accs)), key=lambda i: (accs[i], -i)) + 1
  assert summary['best_epoch'] == best_epoch
  best, meta = checkpointing.restore_best(w1)
  assert meta['val_accuracy'] == pytest.approx(accs[best_epoch - 1])
  val = summary['final_evaluation']['validation']
  assert val['accuracy'] == summary['history'][best_epoch - 1]['val_accuracy']
  assert val['loss'] == summary['history'][best_epoch - 1]['val_loss']
  # Training's validation is `evaluate`'s loop: the same numbers.
  report = evaluate.evaluate(w1, data_dir, 'validation',
                             output_dir=str(tmp_path / 'eval'))
  assert val['count'] == report['num_examples'] == 40
  assert val['accuracy'] == pytest.approx(report['accuracy'], abs=1e-6)
  assert val['loss'] == pytest.approx(report['log_loss_uncalibrated'],
                                      rel=1e-6)

  # Stage 2 starts from exactly stage 1's best params and batch stats.
  config2 = tiny_config(data_dir, 'stage2.py', init_from=w1, num_epochs=1,
                        precise_bn_batches=2)
  assert config2.augment is False and config2.dropout_rate == 0.3
  mesh = sharding.make_mesh()
  state = steps.init_state(config2, models.create_model(config2), mesh)
  _assert_trees_equal(state.variables(), best)
  assert int(state.step) == 0
  assert int(state.opt_state.count) == 0
  summary2 = train.train_and_evaluate(config2, w2)
  assert summary2['init_from'] == w1
  # Epoch 0 is the restored model, evaluated before any step.
  assert [h['epoch'] for h in summary2['history']] == [0, 1]
  assert [h['step'] for h in summary2['history']] == [0, 6]
  assert 'train_loss' not in summary2['history'][0]
  assert summary2['best_val_accuracy'] == max(
      h['val_accuracy'] for h in summary2['history'])
  with pytest.raises(errors.UserError, match='image_size'):
    steps.init_state(tiny_config(data_dir, 'stage2.py', init_from=w1,
                                 image_size=(32, 24)), None, mesh)


@pytest.mark.slow
def test_stage2_keeps_its_baseline_when_it_cannot_improve(data_dir,
                                                          tmp_path):
  """A fine-tune at a negligible learning rate never beats epoch 0: best/ is
  the restored model itself. Stage 1 validates on an eval_steps cap."""
  w1, w2 = str(tmp_path / 'w1'), str(tmp_path / 'w2')
  capped = train.train_and_evaluate(
      tiny_config(data_dir, num_epochs=1, eval_steps=1), w1)
  assert capped['final_evaluation']['validation']['count'] == 32
  assert capped['calibration']['num_examples'] == 32
  stage1_best, _ = checkpointing.restore_best(w1)
  summary = train.train_and_evaluate(tiny_config(
      data_dir, 'stage2.py', init_from=w1, num_epochs=2, learning_rate=1e-12,
      min_learning_rate=1e-12, precise_bn_batches=0), w2)
  assert summary['best_epoch'] == 0 and summary['best_step'] == 0
  assert len(summary['history']) == 3
  best, meta = checkpointing.restore_best(w2)
  assert meta['epoch'] == 0
  _assert_trees_equal(best, stage1_best)


@pytest.mark.slow
def test_user_errors_leave_the_workdir_alone(data_dir, tmp_path):
  """Batch larger than the data: nothing is created. Another model in a
  trained workdir: refused up front, config.json unchanged. A live lock:
  refused, naming its holder."""
  workdir = str(tmp_path / 'w')
  with pytest.raises(errors.UserError, match='lower config.batch_size'):
    train.train_and_evaluate(tiny_config(data_dir, batch_size=4096,
                                         steps_per_epoch=None), workdir)
  assert not os.path.exists(workdir)
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)
  config_file = os.path.join(workdir, 'config.json')
  with open(config_file) as f:
    before = f.read()
  with pytest.raises(errors.UserError, match=r"image_size=\(32, 24\) here"):
    train.train_and_evaluate(tiny_config(data_dir, num_epochs=2,
                                         image_size=(32, 24)), workdir)
  with open(config_file) as f:
    assert f.read() == before
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(os.path.join(workdir, train.LOCK_FILE), 'w') as f:
      json.dump({'host': os.uname().nodename, 'pid': holder.pid}, f)
    with pytest.raises(train.locking.LockedError, match=f'pid {holder.pid}'):
      train.train_and_evaluate(tiny_config(data_dir, num_epochs=2), workdir)
  finally:
    holder.kill()
    holder.wait()
  with open(config_file) as f:
    assert f.read() == before


OLD_LOOP = {'epoch': 4, 'epoch_step': 0, 'best': None, 'stopped_early': False,
            'history': [{}] * 4, 'train_seconds': 1.0,
            'plateau': {'best_value': 0.1, 'plateau_count': 2, 'scale': 0.5,
                        'cooldown_count': 0},
            'early_stopping': {'best_metric': 0.97, 'patience_count': 1}}


def test_loop_state_json_round_trip_and_earlier_versions():
  loop = train.LoopState(plateau=callbacks.Plateau(5e-4, 0.1, 2),
                         early_stopping=callbacks.EarlyStopping(0.97, 1, 4),
                         epoch=4, history=[{}] * 4)
  assert train.LoopState.from_json(
      json.loads(json.dumps(loop.to_json()))) == loop
  with pytest.raises(checkpointing.IncompatibleError, match='older'):
    train.LoopState.from_json(OLD_LOOP)


def test_workdir_of_an_older_version_stops_in_one_line(data_dir, tmp_path):
  """Its checkpoint is intact: kept where it is, not set aside as damaged."""
  workdir = str(tmp_path / 'w')
  config = tiny_config(data_dir)
  state = steps.init_state(config, models.create_model(config),
                           sharding.make_mesh())
  ckpt = checkpointing.Checkpointer(workdir, config)
  ckpt.save_latest(6, state, OLD_LOOP)
  ckpt.close()
  with pytest.raises(errors.UserError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(os.path.join(workdir, 'checkpoints', '6') + ': ')
  assert 'older gender_jax version' in message and '--workdir' in message
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['6']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))


def _interrupt_after(monkeypatch, epoch_to_stop, batches):
  """Makes train_iterator raise KeyboardInterrupt mid-epoch (a kill)."""
  original = input_pipeline.train_iterator

  def iterator(config, builder, mesh, epoch, start_step=0):
    for i, batch in enumerate(original(config, builder, mesh, epoch,
                                       start_step)):
      if epoch == epoch_to_stop and i == batches:
        raise KeyboardInterrupt('simulated kill')
      yield batch
  monkeypatch.setattr(input_pipeline, 'train_iterator', iterator)


@pytest.mark.slow
@pytest.mark.parametrize('damaged', [False, True])
def test_killed_run_resumes_at_the_right_step(data_dir, tmp_path,
                                              monkeypatch, damaged):
  """A kill mid-epoch resumes exactly; with the latest checkpoint damaged
  too, it resumes from the one before (set aside: one lost step)."""
  config = tiny_config(data_dir, checkpoint_every_steps=4)
  full = str(tmp_path / 'full')
  train.train_and_evaluate(config, full)
  killed = str(tmp_path / 'killed')
  _interrupt_after(monkeypatch, epoch_to_stop=1, batches=5)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, killed)
  monkeypatch.undo()
  checkpoints = os.path.join(killed, 'checkpoints')
  # Kept: the end of epoch 1 (6) and mid-epoch 2 (6 + 2 batches).
  assert sorted(os.listdir(checkpoints)) == ['6', '8']
  if damaged:
    damage(os.path.join(checkpoints, '8', 'state'))
  resumed = train.train_and_evaluate(config, killed)
  assert [h['step'] for h in resumed['history']] == [6, 12]
  assert bool(glob.glob(os.path.join(killed, 'checkpoints.corrupt',
                                     '8-*'))) == damaged
  ckpt = checkpointing.Checkpointer(killed)
  assert ckpt.latest_step() == 12
  ckpt.close()
  # Same data order and randomness: the resumed run ends where the full run
  # ends.
  abstract = checkpointing.abstract_state(
      config, steps.create_train_state,
      sharding.replicated(sharding.make_mesh()))
  states = []
  for workdir in (full, killed):
    ckpt = checkpointing.Checkpointer(workdir)
    states.append(ckpt.restore_latest(abstract)[0])
    ckpt.close()
  for x, y in zip(_params(states[0].params), _params(states[1].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path,
                                                  monkeypatch):
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)
  original = steps.per_example_metrics
  monkeypatch.setattr(steps, 'per_example_metrics', lambda logits, labels: (
      original(logits, labels)[0] * np.nan, original(logits, labels)[1]))
  with pytest.raises(train.TrainingError, match='Non-finite.*step 8.*intact'):
    train.train_and_evaluate(tiny_config(data_dir, checkpoint_every_steps=2),
                             workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.latest_step() == 6
  ckpt.close()
  # The failed run saved nothing, so config.json still describes the first.
  assert checkpointing.read_config(workdir).checkpoint_every_steps == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_script_missing_dataset_is_a_clear_error(tmp_path, compile_cache):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
       '--config=' + os.path.join(REPO, 'configs', 'stage1.py'),
       f'--workdir={tmp_path / "w"}', f'--config.data_dir={tmp_path / "no"}'],
      capture_output=True, text=True, timeout=300, check=False,
      env=cache_env(compile_cache))
  assert out.returncode == 2
  assert 'prepare_data.py' in out.stderr
  assert 'Traceback' not in out.stderr
