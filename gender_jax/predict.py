"""Jitted inference: p(male) and MC-Dropout uncertainty for image batches.

`predict_batch` is the pure function; `make_predict_fn` jits it once for a
fixed batch shape; `Predictor` wraps a trained workdir for notebooks and the
labeller: arrays (`predict`) or image files (`predict_files`: decoded ahead,
batched, one batch on the devices while the caller handles the one before),
the last batch padded so that one compiled program serves every batch.

MC-Dropout runs the model with dropout on and BatchNorm on its running
averages (`mc_dropout=True`). All samples come from one jitted call: the
samples are a `vmap` over dropout keys, and because the convolutional trunk
does not depend on the key, `vmap` leaves it unbatched: the convolutions run
once per image and only the dense head runs `mc_samples` times.

Each image's dropout key is derived from the seed and an integer id of the
image (the labeller uses a hash of its path), not from its batch, so MC
results do not depend on batch size, batch composition or resumption.

Every logit (deterministic and each MC sample) is divided by the workdir's
temperature (`gender_jax.calibration`) before it becomes a probability.
`tta='flip'` averages the logits of each image and its horizontal mirror
(an MC sample runs both views with the same dropout key).
"""

import time
import zlib
from typing import (Dict, Iterator, List, NamedTuple, Optional, Sequence,
                    Union)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gender_jax import image_io
from gender_jax import sharding as sharding_lib

MC_KEYS = ('mc_mean', 'mc_std', 'mc_entropy', 'mc_mutual_info')
TTA_MODES = ('none', 'flip')       # Test-time augmentation: the views averaged.


def binary_entropy(p):
  """Entropy in nats of Bernoulli(p), 0 at p in {0, 1}."""
  return jax.scipy.special.entr(p) + jax.scipy.special.entr(1.0 - p)


def mc_statistics(sample_logits) -> Dict[str, jnp.ndarray]:
  """MC-Dropout statistics from (S, N) logits, each (N,).

  mc_mean: mean p(male) over samples; mc_std: its standard deviation;
  mc_entropy: predictive entropy H[mean p] (nats); mc_mutual_info: BALD,
  H[mean p] - mean_s H[p_s] (nats), the part of the uncertainty that comes
  from the weights rather than from the data.
  """
  p = jax.nn.sigmoid(sample_logits.astype(jnp.float32))
  mean = p.mean(axis=0)
  entropy = binary_entropy(mean)
  expected_entropy = binary_entropy(p).mean(axis=0)
  return {
      'mc_mean': mean,
      'mc_std': p.std(axis=0),
      'mc_entropy': entropy,
      'mc_mutual_info': jnp.maximum(entropy - expected_entropy, 0.0),
  }


def path_ids(paths: Sequence[Union[str, bytes]]) -> np.ndarray:
  """Stable uint32 ids (CRC-32 of the path's bytes) for per-image dropout keys.

  A str path is hashed as the bytes the file system gave (UTF-8, with the
  surrogate escapes of a name that is not valid UTF-8 turned back into its
  original bytes), so every file name has an id, the same on every machine.
  """
  return np.asarray(
      [zlib.crc32(p if isinstance(p, bytes)
                  else p.encode('utf-8', 'surrogateescape')) for p in paths],
      np.uint32)


def _views(images, tta: str):
  """(V, N, H, W, 3): the images and, for tta='flip', their mirrors."""
  return jnp.stack([images, images[:, :, ::-1]] if tta == 'flip'
                   else [images])


def predict_batch(model, variables, images, ids, *, mc_samples: int = 1,
                  seed: int = 0, temperature: float = 1.0,
                  tta: str = 'none') -> Dict[str, jnp.ndarray]:
  """Logits, p(male) and (if mc_samples > 1) MC statistics for a batch.

  Args:
    model: a `GenderCNN`.
    variables: {'params', 'batch_stats'}.
    images: (N, H, W, 3) in 0..255.
    ids: (N,) uint32 image ids; image i's dropout keys are
      split(fold_in(key(seed), ids[i]), mc_samples). Unused if mc_samples == 1.
    mc_samples: number of dropout samples; 1 means deterministic only.
    seed: dropout seed.
    temperature: every logit (each MC sample's too) is divided by it.
    tta: one of `TTA_MODES`; 'flip': each logit is the mean of the image's
      and its mirror's (an MC sample uses one dropout key for both).

  Returns:
    {'logit', 'p_male'} (deterministic: dropout off) and, for mc_samples > 1,
    the `MC_KEYS`, each (N,) float32.
  """
  views = _views(images, tta)
  if mc_samples == 1:
    logits = model.apply(variables, views.reshape(-1, *images.shape[1:]),
                         train=False).reshape(len(views), -1).mean(0)
    logits = logits / temperature
    return {'logit': logits, 'p_male': jax.nn.sigmoid(logits)}
  base = jax.random.key(seed)

  def one_sample(views, key):
    return jax.vmap(lambda view: model.apply(
        variables, view[None], train=False, mc_dropout=True,
        rngs={'dropout': key})[0])(views).mean()

  def one_image(views, image_id):
    # The deterministic pass is traced like the samples so that XLA sees
    # the same convolutions and computes the trunk once for both.
    logit = jax.vmap(lambda view: model.apply(
        variables, view[None], train=False)[0])(views).mean()
    keys = jax.random.split(jax.random.fold_in(base, image_id), mc_samples)
    return logit, jax.vmap(one_sample, in_axes=(None, 0))(views, keys)

  logits, samples = jax.vmap(one_image, in_axes=(1, 0))(views, ids)
  logits, samples = logits / temperature, samples / temperature  # (N,), (N, S)
  return {'logit': logits, 'p_male': jax.nn.sigmoid(logits),
          **mc_statistics(samples.T)}


def local_mesh() -> Mesh:
  """A ('data',) mesh over this process's devices (single-host inference)."""
  return Mesh(np.asarray(jax.local_devices()), ('data',))


def check_options(temperature: float, tta: str) -> None:
  """ValueError unless temperature is a finite float > 0 and tta a mode."""
  if not (np.isfinite(temperature) and temperature > 0):
    raise ValueError(f'temperature={temperature}: expected a finite float > 0.')
  if tta not in TTA_MODES:
    raise ValueError(f'tta={tta!r}: expected one of {TTA_MODES}.')


def make_predict_fn(model, mc_samples: int = 1, seed: int = 0,
                    mesh: Optional[Mesh] = None, *, temperature: float = 1.0,
                    tta: str = 'none'):
  """`predict_batch` jitted: fn(variables, images, ids) -> dict of (N,).

  With a mesh, images and ids are split over 'data', variables replicated and
  the outputs replicated (every host can read all of them).
  """
  if mc_samples < 1:
    raise ValueError(f'mc_samples={mc_samples}: expected an int >= 1.')
  check_options(temperature, tta)

  def fn(variables, images, ids):
    return predict_batch(model, variables, images, ids,
                         mc_samples=mc_samples, seed=seed,
                         temperature=temperature, tta=tta)

  if mesh is None:
    return jax.jit(fn)
  data = sharding_lib.data_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, data, data), out_shardings=rep)


RUNTIMES = ('jax', 'onnxruntime')


def _check_runtime(runtime: str, mc_samples: int) -> None:
  if runtime not in RUNTIMES:
    raise ValueError(f'runtime={runtime!r}: expected one of {RUNTIMES}.')
  if runtime == 'onnxruntime':
    if mc_samples != 1:
      raise ValueError(f'mc_samples={mc_samples} with runtime=onnxruntime: '
                       'MC-Dropout runs only in JAX (runtime=jax).')
    try:
      import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
      import onnx  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ValueError(f'runtime=onnxruntime needs onnx and onnxruntime ({e}): '
                       "pip install '.[onnx]'.") from e


class FileBatch(NamedTuple):
  """A batch of `Predictor.predict_files`: paths[start:start + len(errors)]."""
  start: int
  errors: List[str]                 # Per path: '' or why it did not decode.
  outputs: Dict[str, np.ndarray]    # As `predict`; NaN for unreadable files.


class Predictor:
  """A trained model ready for inference on numpy batches of any length.

  Example (notebook):
    predictor = Predictor.from_workdir('runs/stage2', mc_samples=20)
    out = predictor.predict(images_uint8)        # dict of (N,) numpy arrays
    for batch in predictor.predict_files(paths, resize='crop'):
      ...                                        # `FileBatch`es, in order

  ``runtime='onnxruntime'`` runs the deterministic pass (mc_samples=1 only)
  on the model exported by `gender_jax.onnx_export`, built in memory from
  the same variables, instead of XLA.

  `temperature` divides every logit (`from_workdir` reads the workdir's
  calibration.json); `tta` is one of `TTA_MODES` (see `predict_batch`);
  `checkpoint_step` is the step of the checkpoint the variables come from
  (None if unknown). `settings()` lists what changes the numbers.
  """

  def __init__(self, model, variables, image_size, *, mc_samples: int = 1,
               batch_size: int = 64, seed: int = 0,
               mesh: Optional[Mesh] = None, runtime: str = 'jax',
               temperature: float = 1.0, tta: str = 'none',
               checkpoint_step: Optional[int] = None):
    _check_runtime(runtime, mc_samples)
    check_options(temperature, tta)
    self.runtime = runtime
    self.temperature = float(temperature)
    self.tta = tta
    self.model = model
    self.image_size = tuple(image_size)
    self.mc_samples = mc_samples
    self.batch_size = batch_size
    self.seed = seed
    self.checkpoint_step = checkpoint_step
    self.mesh = mesh or local_mesh()
    n_dev = self.mesh.devices.size
    if batch_size < 1 or batch_size % n_dev:
      raise ValueError(
          f'batch_size={batch_size}: expected a positive multiple of the '
          f'{n_dev} device(s).')
    self.variables = jax.device_put(
        {'params': variables['params'],
         'batch_stats': variables['batch_stats']},
        sharding_lib.replicated(self.mesh))
    self._fn = make_predict_fn(model, mc_samples, seed, self.mesh,
                               temperature=temperature, tta=tta)
    self._onnx = None
    if runtime == 'onnxruntime':
      from gender_jax import onnx_predict  # pylint: disable=g-import-not-at-top
      self._onnx = onnx_predict.OnnxModel.from_variables(
          variables, image_size, temperature=temperature)
    self._data = sharding_lib.data_sharding(self.mesh)
    self._keys = ('logit', 'p_male') + (MC_KEYS if mc_samples > 1 else ())

  @classmethod
  def from_workdir(cls, workdir: str, **kwargs) -> 'Predictor':
    """Loads a workdir's best model (see `checkpointing.load_model`) and,
    unless `temperature` is given, its calibration.json's temperature."""
    from gender_jax import calibration  # pylint: disable=g-import-not-at-top
    from gender_jax import checkpointing  # pylint: disable=g-import-not-at-top
    config, model, variables, meta = checkpointing.load_model(workdir)
    if 'temperature' not in kwargs:
      kwargs['temperature'] = calibration.read_temperature(workdir,
                                                           meta.get('step'))
    return cls(model, variables, config.image_size,
               checkpoint_step=meta.get('step'), **kwargs)

  def settings(self) -> dict:
    """What changes the numbers (the constructor's arguments and the
    checkpoint's step), e.g. for a results file to record."""
    return {'mc_samples': self.mc_samples, 'seed': self.seed,
            'runtime': self.runtime, 'temperature': self.temperature,
            'tta': self.tta, 'checkpoint_step': self.checkpoint_step}

  def _dispatch(self, images: np.ndarray, ids: np.ndarray):
    """Starts one batch (padded to batch_size: one compiled program serves
    all) on the devices, async (ONNX Runtime: runs it, returns numpy)."""
    images, ids = self._pad(images, np.uint8), self._pad(ids, np.uint32)
    if self._onnx is not None:
      return self._onnx_outputs(images)
    images = jax.device_put(images, self._data)
    ids = jax.device_put(ids, self._data)
    return self._fn(self.variables, images, ids)

  def _pad(self, x, dtype) -> np.ndarray:
    """`x` as `dtype`, zero-padded to batch_size rows."""
    x = np.asarray(x, dtype)
    if len(x) == self.batch_size:
      return x
    out = np.zeros((self.batch_size, *x.shape[1:]), dtype)
    out[:len(x)] = x
    return out

  def _fetch(self, outputs, n: int) -> Dict[str, np.ndarray]:
    """The first `n` rows of a dispatched batch's outputs, as numpy."""
    return {k: np.asarray(outputs[k])[:n] for k in self._keys}

  def _onnx_outputs(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """ONNX Runtime's outputs; with tta='flip' one run over the images and
    their mirrors, whose logits are averaged."""
    if self.tta == 'none':
      return self._onnx(images)
    both = np.concatenate([images, images[:, :, ::-1]])
    logits = self._onnx(both)['logit'].reshape(2, len(images)).mean(0)
    return {'logit': logits,
            'p_male': np.exp(-np.logaddexp(np.float32(0), -logits))}

  def warm_up(self) -> float:
    """Runs one batch of zeros (compiles the program); returns its seconds,
    so that callers can time the batches after it alone."""
    start = time.perf_counter()
    zeros = np.zeros((self.batch_size, *self.image_size, 3), np.uint8)
    self._fetch(self._dispatch(zeros, np.zeros(self.batch_size, np.uint32)), 0)
    return time.perf_counter() - start

  def predict(self, images, ids: Optional[np.ndarray] = None
              ) -> Dict[str, np.ndarray]:
    """Predictions for (N, H, W, 3) images in 0..255, in batches.

    `ids` (N,) uint32 select the images' dropout keys (default 0..N-1).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (*self.image_size, 3):
      raise ValueError(f'images of shape {images.shape}: expected (N, '
                       f'{self.image_size[0]}, {self.image_size[1]}, 3).')
    n = len(images)
    ids = np.arange(n, dtype=np.uint32) if ids is None else np.asarray(ids)
    size = self.batch_size
    dispatched = [(min(size, n - start),
                   self._dispatch(images[start:start + size],
                                  ids[start:start + size]))
                  for start in range(0, n, size)]
    return _concatenated([self._fetch(out, m) for m, out in dispatched],
                         self._keys)

  def predict_files(
      self, paths: Sequence[str], ids: Optional[np.ndarray] = None, *,
      resize: str = 'stretch',
      boxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
      box_margin: float = 0.0, num_workers: int = 4) -> Iterator[FileBatch]:
    """Decodes, frames and predicts image files: a `FileBatch` per
    batch_size paths, in order.

    `num_workers` threads decode ahead (`image_io.decode_batches`; `resize`,
    `boxes` (a face box or None per path) and `box_margin` frame each image
    as `image_io.decode` does), and the next batch runs on the devices while
    the caller handles this one. `ids` as in `predict` (default: `path_ids`
    of `paths`).
    """
    ids = path_ids(paths) if ids is None else np.asarray(ids, np.uint32)
    start, in_flight = 0, None
    for images, errors in image_io.decode_batches(
        paths, self.image_size, self.batch_size, num_workers, resize=resize,
        boxes=boxes, box_margin=box_margin):
      out = self._dispatch(images, ids[start:start + len(errors)])
      if in_flight is not None:
        yield self._file_batch(*in_flight)
      in_flight, start = (start, errors, out), start + len(errors)
    if in_flight is not None:
      yield self._file_batch(*in_flight)

  def _file_batch(self, start: int, errors: List[str], out) -> FileBatch:
    """A dispatched batch as numpy, NaN where a file did not decode."""
    readable = np.asarray([not e for e in errors])
    return FileBatch(start, errors, {
        k: np.where(readable, v, np.float32(np.nan))
        for k, v in self._fetch(out, len(errors)).items()})


def _concatenated(chunks: Sequence[Dict[str, np.ndarray]], keys
                  ) -> Dict[str, np.ndarray]:
  """The `keys` of `chunks` (dicts of (n,) arrays) joined; (0,) if none."""
  return {k: np.concatenate([c[k] for c in chunks]) if chunks
          else np.zeros((0,), np.float32) for k in keys}
