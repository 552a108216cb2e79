"""CPU speed of gender_jax against the original Keras model, side by side.

One process, one machine: the project's jitted, state-donating train step
(`gender_jax.steps.make_train_step`, augmentation off since the Keras
`train_on_batch` has none) and its jitted inference function
(`gender_jax.predict.make_predict_fn`, what the labeler runs) are timed
interleaved with Keras' `train_on_batch` / `predict_on_batch` of the same
architecture (`keras_reference.build_keras_model`) on the same random batch.
Warm-up calls are excluded; each number is the median of --repeats. TF gets
the same threads as XLA:CPU (all cores), and both run under the package's
CPU process settings (`gender_jax.cpu`: the script re-executes itself once
with huge-page malloc; GENDER_JAX_NO_REEXEC=1 measures without; importing
gender_jax adds its XLA:CPU flags to XLA_FLAGS unless XLA_FLAGS already sets
them). Then the labeler
(`gender_jax.label.label_images`, decoding included) runs over a folder of
JPEGs and is compared with model-only inference at the same batch size.
With the onnx extra, ONNX Runtime on the exported model (`onnx_export`) is
timed against Keras the same way (`onnx_infer_ratio=`) and the labeler runs
with each runtime.

  python benchmarks/speed.py                      # 218x178, train 32, infer 64
  python benchmarks/speed.py --images_dir=/work/shared/data/gender-faces/Test

The last two lines are `train_ratio=` and `infer_ratio=` (JAX / Keras
images per second; above 1 means JAX is faster). --kernels=plain times the
plain Flax layers instead of the CPU kernels (config.kernels).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from gender_jax import cpu  # pylint: disable=g-import-not-at-top

# The package's CPU process settings (huge-page malloc), for both sides.
cpu.reexec_with_malloc_tunables()

if '--profile' in sys.argv:
  # Per-op timings need XLA:CPU's trace annotations, set before jax loads.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import label  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import predict  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from gender_jax import steps  # pylint: disable=g-import-not-at-top,wrong-import-position


def project_config(image_size, batch_size, compute_dtype, kernels='auto'):
  """configs/default.py with the benchmark's sizes (no augmentation)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_sibling(os.path.join(root, 'configs', 'x.py'),
                                   'default.py')
  config.image_size = tuple(image_size)
  config.batch_size = batch_size
  config.augment = False
  config.compute_dtype = compute_dtype
  config.kernels = kernels
  return config


class JaxSide:
  """The project's train step and inference function on one batch each."""

  def __init__(self, config, train_x, train_y, infer_x):
    self.config = config
    self.mesh = sharding.make_mesh()
    self.model = models.create_model(config)
    self.state = steps.init_state(config, self.model, self.mesh)
    self.step = steps.make_train_step(config, self.model, self.mesh)
    data = sharding.data_sharding(self.mesh)
    self.batch = jax.device_put({'image': train_x, 'label': train_y}, data)
    self.rng = jax.random.key(1)
    self.predict_fn = predict.make_predict_fn(self.model, mesh=self.mesh)
    self.infer_x = jax.device_put(infer_x, data)
    self.ids = jax.device_put(np.arange(len(infer_x), dtype=np.uint32), data)

  def variables(self):
    return {'params': self.state.params, 'batch_stats': self.state.batch_stats}

  def train(self):
    self.state, metrics = self.step(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))

  def infer(self):
    jax.block_until_ready(
        self.predict_fn(self.variables(), self.infer_x, self.ids))


class KerasSide:
  """The original model in Keras on the same batches (float32 0..255)."""

  def __init__(self, image_size, train_x, train_y, infer_x):
    self.model = keras_reference.build_keras_model(image_size)
    keras_reference.compile_model(self.model)
    self.train_x = train_x.astype(np.float32)
    self.train_y = train_y.astype(np.float32)[:, None]
    self.infer_x = infer_x.astype(np.float32)

  def train(self):
    self.model.train_on_batch(self.train_x, self.train_y)

  def infer(self):
    self.model.predict_on_batch(self.infer_x)


def _op_names(hlo_text):
  """{instruction name: op_name metadata} of a compiled HLO module's ENTRY."""
  import re  # pylint: disable=g-import-not-at-top
  entry = hlo_text[hlo_text.find('ENTRY'):]
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^\s*%?([\w.-]+) = [^\n]*?op_name="([^"]*)"', entry, re.MULTILINE)}


def profile(fn, name, hlo_text, top=25):
  """Prints the `top` XLA:CPU ops of one call of `fn` by traced time (ms).

  Each compiled op (fusion.N; ynn_fusion.N: YNNPACK dots, reductions) is shown
  with the JAX op it comes from, read from `hlo_text` (compiled HLO).
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  fn()   # Same warm-up as `timed`: the traced call follows one of its own.
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      start = time.perf_counter()
      fn()
      wall = time.perf_counter() - start
    path = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                     recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      totals[e['name']] += e['dur']
  total = totals.get('ThunkExecutor::Execute', 0)
  print(f'--- {name}: {wall * 1e3:.0f} ms wall, {total / 1e3:.0f} ms in traced '
        "XLA thunks (summed over threads; XLA:CPU's trace shows convolution "
        'thunks at ~0 ms, so most of the rest is convolutions); top ops:')
  skip = ('Thunk', '$', 'Pjit', 'Common', 'Parse', 'Handle', 'Alloc',
          'Python', 'Slinky', 'end: ')
  names = _op_names(hlo_text)
  ops = [(k, t) for k, t in totals.most_common() if not k.startswith(skip)]
  for k, t in ops[:top]:
    print(f'{t / 1e3:9.1f} ms  {k:30s} {names.get(k, "")[-90:]}')


def timed(fn):
  """Seconds of one call of fn, right after an untimed call of it.

  The sides alternate, so each timed call follows a call of the same side:
  the other framework's just-freed memory and still-spinning worker threads
  (measured: +15-50% on the JAX step when timed straight after Keras) do not
  land on the call being timed.
  """
  fn()
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def write_jpegs(directory, count, image_size, seed=0):
  """`count` smooth random JPEGs of (H, W) = image_size in Male/Female."""
  rng = np.random.default_rng(seed)
  h, w = image_size
  for i in range(count):
    folder = os.path.join(directory, ('Female', 'Male')[i % 2])
    os.makedirs(folder, exist_ok=True)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    image.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def labeler_speed(jax_side, images_dir, batch_size, workdir, repeats=3,
                  runtime='jax'):
  """label_images' images/s (decode included, compile excluded) with the
  Predictor's `runtime` ('jax' or 'onnxruntime').

  The median of `repeats` full runs (each into a new CSV): one run over a
  few hundred images lasts about two seconds, short enough for a passing
  load spike on a 2-core machine to move a single reading by 15%.
  """
  checkpointing.write_config(workdir, jax_side.config)
  predictor = predict.Predictor(jax_side.model, jax_side.variables(),
                                jax_side.config.image_size,
                                batch_size=batch_size, runtime=runtime)
  rates = []
  for i in range(repeats):
    summary = label.label_images(workdir, images_dir,
                                 os.path.join(workdir, f'labels{i}.csv'),
                                 predictor=predictor, progress=False)
    rates.append(summary['images_per_second'])
  return statistics.median(rates), summary['num_labelled_now']


def onnx_speed(jax_side, keras_side, repeats, warmup):
  """ONNX Runtime against Keras inference on the same batch, interleaved.

  The ONNX model is exported in memory from the JAX side's variables
  (`gender_jax.onnx_export`); ONNX Runtime uses its default threads (the
  cores). Returns {'onnx_infer', 'keras_infer'} images per second (medians).
  """
  from gender_jax import onnx_predict  # pylint: disable=g-import-not-at-top
  images = keras_side.infer_x.astype(np.uint8)
  model = onnx_predict.OnnxModel.from_variables(jax_side.variables(),
                                                jax_side.config.image_size)
  fns = {'onnx_infer': lambda: model(images), 'keras_infer': keras_side.infer}
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {n: [] for n in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return {n: len(images) / statistics.median(t) for n, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', default='218,178')
  parser.add_argument('--train_batch', type=int, default=32)
  parser.add_argument('--infer_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--compute_dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--kernels', default='auto',
                      choices=('auto', 'plain', 'cpu'),
                      help='config.kernels: the model\'s block layers.')
  parser.add_argument('--images_dir', default='',
                      help='Folder for the labeler (default: generated JPEGs).')
  parser.add_argument('--num_images', type=int, default=512,
                      help='Generated JPEGs when --images_dir is not given.')
  parser.add_argument('--skip_labeler', action='store_true')
  parser.add_argument('--skip_onnx', action='store_true',
                      help='Skip ONNX Runtime (needs the onnx extra).')
  parser.add_argument('--profile', action='store_true',
                      help='Also print the top XLA ops of a train step and '
                      'an inference batch (HLO: dump with XLA_FLAGS='
                      '--xla_dump_to=DIR to map fusion names to ops).')
  args = parser.parse_args()
  image_size = tuple(int(v) for v in args.image_size.split(','))
  threads = os.cpu_count()
  keras_reference.set_threads(threads)

  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (args.train_batch, *image_size, 3), np.uint8)
  train_y = rng.integers(0, 2, (args.train_batch,)).astype(np.int32)
  infer_x = rng.integers(0, 256, (args.infer_batch, *image_size, 3), np.uint8)

  config = project_config(image_size, args.train_batch, args.compute_dtype,
                          args.kernels)
  jax_side = JaxSide(config, train_x, train_y, infer_x)
  keras_side = KerasSide(image_size, train_x, train_y, infer_x)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} '
        f'(kernels {models.resolve_kernels(args.kernels)}) '
        f'({threads} threads, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}); '
        f'TF intra-op threads {threads}; load average {os.getloadavg()}')

  names = ('jax_train', 'keras_train', 'jax_infer', 'keras_infer')
  fns = (jax_side.train, keras_side.train, jax_side.infer, keras_side.infer)
  for fn in fns:
    for _ in range(args.warmup):
      fn()
  times = {n: [] for n in names}
  for _ in range(args.repeats):
    for name, fn in zip(names, fns):
      times[name].append(timed(fn))
  if args.profile:
    profile(jax_side.train, 'jax train step', jax_side.step.lower(
        jax_side.state, jax_side.batch, jax_side.rng).compile().as_text())
    profile(jax_side.infer, 'jax inference', jax_side.predict_fn.lower(
        jax_side.variables(), jax_side.infer_x, jax_side.ids).compile(
        ).as_text())
  batch = {'train': args.train_batch, 'infer': args.infer_batch}
  rate = {n: batch[n.split('_')[1]] / statistics.median(t)
          for n, t in times.items()}
  for n in names:
    print(f'{n}: {rate[n]:.1f} img/s (median of {args.repeats}: '
          f'{statistics.median(times[n]) * 1e3:.0f} ms per batch of '
          f'{batch[n.split("_")[1]]})')

  if not args.skip_labeler:
    with tempfile.TemporaryDirectory() as tmp:
      images_dir = args.images_dir
      if not images_dir:
        images_dir = os.path.join(tmp, 'images')
        write_jpegs(images_dir, args.num_images, image_size)
      label_rate, count = labeler_speed(jax_side, images_dir, args.infer_batch,
                                        os.path.join(tmp, 'workdir'))
      if not args.skip_onnx:
        onnx_label_rate, _ = labeler_speed(
            jax_side, images_dir, args.infer_batch,
            os.path.join(tmp, 'workdir_onnx'), runtime='onnxruntime')
        print(f'labeler --runtime=onnxruntime: {onnx_label_rate:.1f} img/s '
              f'end to end over {count} images')
    model_rate = rate['jax_infer']
    print(f'labeler: {label_rate:.1f} img/s end to end over {count} images '
          f'(decode included) vs model-only {model_rate:.1f} img/s')
    print(f'label_ratio={label_rate / model_rate:.3f}')
  if not args.skip_onnx:
    onnx_rate = onnx_speed(jax_side, keras_side, args.repeats, args.warmup)
    print(f'onnx_infer: {onnx_rate["onnx_infer"]:.1f} img/s, keras_infer '
          f'{onnx_rate["keras_infer"]:.1f} img/s (interleaved, batch '
          f'{args.infer_batch}); load average {os.getloadavg()}')
    print(f'onnx_infer_ratio='
          f'{onnx_rate["onnx_infer"] / onnx_rate["keras_infer"]:.3f}')
  print(f'train_ratio={rate["jax_train"] / rate["keras_train"]:.3f}')
  print(f'infer_ratio={rate["jax_infer"] / rate["keras_infer"]:.3f}')


if __name__ == '__main__':
  main()
