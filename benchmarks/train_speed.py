r"""End-to-end stage-1 training speed: the project's train.py vs Keras.

Trains both sides on one prepared dataset with the stage-1 recipe
(augmentation, repeat 2, shuffle buffer 10,000, the same batch size), each as
its own command in a fresh process, the way a user runs it:

  JAX:   python scripts/train.py --config=configs/stage1.py
             --config.steps_per_epoch=S --config.num_epochs=2 ...
  Keras: python benchmarks/keras_reference.py --steps_per_epoch=S --epochs=2 ...

Epoch 1 is the warm-up (compilation, tracing, first reads). Epoch 2 is timed
as each loop reports it: S training steps with the input pipeline and
augmentation, then a full pass over the validation split. images/s is
S * batch / those seconds; the last line is `train_e2e_ratio=` (JAX / Keras).
The whole command's wall time (both epochs, checkpoints, the final
evaluation of validation and test) is printed too.

  python benchmarks/train_speed.py --image_size=112,96 --batch_size=64
  python benchmarks/train_speed.py --image_size=218,178 --batch_size=32

Without --data_dir the raw faces in --raw_dir are prepared once at the image
size into --cache_dir. --jax_flags passes extra train.py flags (e.g.
"--config.aug.resampling=chain") to measure one change against another.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RAW_DIR = flags.DEFINE_string(
    'raw_dir', os.path.join(_ROOT, os.pardir, 'shared', 'data', 'gender-faces'),
    'Raw {Train,Validation,Test}/{Male,Female} JPEGs (used without '
    '--data_dir).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'A prepared TFDS data_dir.')
_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', os.path.join(tempfile.gettempdir(), 'gender_jax_train_speed'),
    'Where --raw_dir is prepared (once per image size).')
_IMAGE_SIZE = flags.DEFINE_list('image_size', ['112', '96'], 'H,W.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size, both sides.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps per epoch.')
_SIDES = flags.DEFINE_list('sides', ['jax', 'keras'], 'Which sides to run.')
_JAX_FLAGS = flags.DEFINE_string('jax_flags', '',
                                 'Extra flags for scripts/train.py.')


def _prepared_data_dir(image_size) -> str:
  if _DATA_DIR.value:
    return _DATA_DIR.value
  data_dir = os.path.join(_CACHE_DIR.value, f'{image_size[0]}x{image_size[1]}')
  if not os.path.isdir(os.path.join(data_dir, 'gender_faces')):
    subprocess.run(
        [sys.executable, os.path.join(_ROOT, 'scripts', 'prepare_data.py'),
         f'--raw_dir={_RAW_DIR.value}', f'--data_dir={data_dir}',
         f'--image_height={image_size[0]}', f'--image_width={image_size[1]}'],
        check=True)
  return data_dir


def _run(command, log_path: str) -> float:
  """Runs `command` (output to `log_path`); returns its wall seconds."""
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    result = subprocess.run(command, cwd=_ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  if result.returncode:
    sys.exit(f'{shlex.join(command)} failed (exit {result.returncode}); see '
             f'{log_path}')
  return seconds


def run_jax(data_dir, image_size, tmp) -> dict:
  workdir = os.path.join(tmp, 'jax')
  command = [sys.executable, os.path.join(_ROOT, 'scripts', 'train.py'),
             '--config=' + os.path.join(_ROOT, 'configs', 'stage1.py'),
             f'--config.data_dir={data_dir}',
             f'--config.image_size={image_size[0]},{image_size[1]}',
             f'--config.batch_size={_BATCH.value}',
             f'--config.steps_per_epoch={_STEPS.value}',
             '--config.num_epochs=2', f'--workdir={workdir}',
             *shlex.split(_JAX_FLAGS.value)]
  wall = _run(command, os.path.join(tmp, 'jax.log'))
  with open(os.path.join(workdir, 'results.json')) as f:
    history = json.load(f)['history']
  return {'epoch_seconds': [h['epoch_seconds'] for h in history],
          'validation_seconds': [h['epoch_seconds'] - h['train_seconds']
                                 for h in history],
          'wall': wall}


def run_keras(data_dir, image_size, tmp) -> dict:
  results = os.path.join(tmp, 'keras.json')
  command = [sys.executable,
             os.path.join(_ROOT, 'benchmarks', 'keras_reference.py'),
             f'--data_dir={data_dir}',
             f'--image_size={image_size[0]},{image_size[1]}',
             f'--batch_size={_BATCH.value}', '--epochs=2',
             f'--steps_per_epoch={_STEPS.value}', f'--results_json={results}']
  wall = _run(command, os.path.join(tmp, 'keras.log'))
  with open(results) as f:
    results = json.load(f)
  return {'epoch_seconds': results['epoch_seconds'],
          'validation_seconds': results['validation_seconds'], 'wall': wall}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  image_size = tuple(int(v) for v in _IMAGE_SIZE.value)
  data_dir = _prepared_data_dir(image_size)
  tmp = tempfile.mkdtemp(prefix='train_speed_')
  images = _STEPS.value * _BATCH.value
  print(f'{image_size[0]}x{image_size[1]}, batch {_BATCH.value}, '
        f'{_STEPS.value} steps/epoch, data {data_dir}, logs {tmp}, '
        f'{os.cpu_count()} CPUs')
  speed = {}
  for side in _SIDES.value:
    run = {'jax': run_jax, 'keras': run_keras}[side]
    result = run(data_dir, image_size, tmp)
    seconds = result['epoch_seconds'][-1]
    speed[side] = images / seconds
    print(f'{side}: epoch 2 (train + validation) {seconds:.1f} s = '
          f'{speed[side]:.1f} images/s (validation '
          f'{result["validation_seconds"][-1]:.1f} s); epoch 1 '
          f'{result["epoch_seconds"][0]:.1f} s; whole command '
          f'{result["wall"]:.1f} s', flush=True)
  if set(speed) == {'jax', 'keras'}:
    print(f'train_e2e_ratio={speed["jax"] / speed["keras"]:.3f}')


if __name__ == '__main__':
  app.run(main)
