"""Generated stand-in data for tests and demos (never the real faces).

`make_raw_dataset` writes a raw folder tree like the real one: a face-like
ellipse on a noisy background, where "male" images have a dark lower face
(beard) and a bluish background and "female" ones a light lower face and a
reddish background, so a tiny CNN learns the class in a few epochs even at
24x20. Sizes vary; most files are RGB JPEG, a few are PNG and other PIL modes
(grey, RGBA, palette, CMYK) to exercise conversion.
"""

import os
import tempfile

import numpy as np
from PIL import Image

DEFAULT_COUNTS = {'Train': (60, 60), 'Validation': (20, 20), 'Test': (20, 20)}
DEFAULT_SIZES = ((108, 83), (64, 52), (40, 32), (151, 111))   # (H, W)
# (PIL mode, format) of every 4th image, in turn; the rest are RGB JPEG.
_ODD_FORMATS = (('RGB', 'PNG'), ('L', 'JPEG'), ('RGBA', 'PNG'), ('P', 'PNG'),
                ('CMYK', 'JPEG'), ('LA', 'PNG'))


def face_image(rng: np.random.Generator, male: bool, size) -> np.ndarray:
  """One uint8 (H, W, 3) synthetic face."""
  h, w = size
  background = np.array([70, 90, 160] if male else [170, 90, 90], np.float32)
  image = np.broadcast_to(background, (h, w, 3)) + rng.normal(0, 20, (h, w, 3))
  yy, xx = np.mgrid[0:h, 0:w]
  cy, cx = h * rng.uniform(0.45, 0.55), w * rng.uniform(0.45, 0.55)
  ry, rx = h * rng.uniform(0.3, 0.4), w * rng.uniform(0.28, 0.38)
  face = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  skin = np.array([220, 180, 150], np.float32) * rng.uniform(0.8, 1.1)
  image[face] = skin + rng.normal(0, 10, (face.sum(), 3))
  lower = face & (yy > cy + 0.3 * ry)
  image[lower] *= 0.35 if male else 1.1
  return np.clip(image, 0, 255).astype(np.uint8)


def make_raw_dataset(root: str, counts=None, seed: int = 0,
                     sizes=DEFAULT_SIZES) -> dict:
  """Writes root/<split>/{Female,Male}/*.{jpg,png}; returns {path: label}.

  counts: {split folder name: (n_female, n_male)}, default DEFAULT_COUNTS.
  """
  counts = DEFAULT_COUNTS if counts is None else counts
  rng = np.random.default_rng(seed)
  labels, k = {}, 0
  for split, (n_female, n_male) in counts.items():
    for cls, label, n in (('Female', 0, n_female), ('Male', 1, n_male)):
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        size = sizes[k % len(sizes)]
        mode, fmt = (_ODD_FORMATS[(k // 4) % len(_ODD_FORMATS)]
                     if k % 4 == 3 else ('RGB', 'JPEG'))
        image = Image.fromarray(face_image(rng, bool(label), size))
        image = image.convert(mode) if mode != 'P' else image.quantize(64)
        path = os.path.join(folder, f'{i:05d}.{fmt.lower()[:3]}'
                            .replace('.jpe', '.jpg'))
        image.save(path, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
        labels[path] = label
        k += 1
  return labels


def add_broken_files(folder: str) -> dict:
  """Adds unreadable files to `folder`; returns {path: what is wrong}."""
  os.makedirs(folder, exist_ok=True)
  broken = {}
  path = os.path.join(folder, 'broken_empty.jpg')
  open(path, 'wb').close()
  broken[path] = 'zero bytes'
  path = os.path.join(folder, 'broken_truncated.jpg')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (96, 96, 3), np.uint8)).save(
      path, 'JPEG', quality=95)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 3])
  broken[path] = 'truncated JPEG'
  path = os.path.join(folder, 'broken_text.jpg')
  with open(path, 'w') as f:
    f.write('this is not an image\n')
  broken[path] = 'text file'
  return broken


def make_tfds_dataset(data_dir: str, image_size=(24, 20), counts=None,
                      seed: int = 0, overwrite: bool = False) -> str:
  """Generates raw faces and prepares them as `gender_faces` in `data_dir`.

  Returns the dataset directory (for `tfds.builder_from_directory`, or pass
  `data_dir` to `gender_jax.dataset.load_builder`). Runs in-process.
  """
  from gender_jax import prepare_data  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as raw:
    make_raw_dataset(raw, counts=counts, seed=seed)
    result = prepare_data.prepare_raw(
        raw, data_dir, image_size=image_size, num_workers=1,
        overwrite=overwrite, show_progress=False)
  return result.output_dir
