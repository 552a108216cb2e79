"""Decode any image file to the model's RGB uint8 (H, W, 3) input.

One function shared by data preparation and the labeller, so that images seen
at labelling time are resized exactly like the training images: PIL decode,
convert to RGB (grey, palette, RGBA, CMYK all become RGB), bilinear resize to
(width, height). EXIF orientation is not applied, as in data preparation.
"""

import concurrent.futures
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# Extensions the labeller picks up (lower case; matching is case-insensitive).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm')


def to_model_input(image: Image.Image, image_size: Sequence[int]) -> np.ndarray:
  """RGB-converts and bilinearly resizes a PIL image to uint8 (H, W, 3)."""
  height, width = image_size
  image = image.convert('RGB')
  if image.size != (width, height):
    image = image.resize((width, height), Image.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def load_image(path: str, image_size: Sequence[int]) -> np.ndarray:
  """Reads `path` and returns uint8 (H, W, 3) at `image_size` = (H, W).

  Raises OSError/ValueError (PIL's) for unreadable, truncated or non-image
  files; callers that must not abort (the labeller) turn them into reasons.
  """
  with Image.open(path) as image:
    image.load()
    return to_model_input(image, image_size)


def error_reason(error: BaseException) -> str:
  """A one-line reason for a failed decode, for CSV error columns."""
  text = ' '.join(str(error).split()) or 'no message'
  return f'{type(error).__name__}: {text}'


def decode(path: str,
           image_size: Sequence[int]) -> Tuple[Optional[np.ndarray], str]:
  """`load_image` that never raises: (uint8 (H, W, 3), '') or (None, reason).

  The one decode of data preparation, the labeller and `load_images`; the
  reason is `error_reason`'s 'ErrorType: message' (an empty file says so).
  """
  try:
    if os.path.getsize(path) == 0:
      raise ValueError('empty file (0 bytes)')
    return load_image(path, image_size), ''
  except Exception as e:  # pylint: disable=broad-except
    return None, error_reason(e)


def list_images(root: str,
                extensions: Tuple[str, ...] = IMAGE_EXTENSIONS) -> List[str]:
  """Image paths under `root`, relative to it with '/' separators, sorted.

  Sorted by (folder, file name), so each folder's images are contiguous and
  the order is the same on every run and machine. Hidden files and folders
  (names starting with '.') are skipped.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'{root!r} is not a directory: pass the folder holding the images.')
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if not d.startswith('.')]
    rel_dir = os.path.relpath(directory, root)
    rel_dir = '' if rel_dir == '.' else rel_dir.replace(os.sep, '/')
    for name in files:
      if not name.startswith('.') and name.lower().endswith(extensions):
        found.append((rel_dir, name))
  found.sort()
  return [f'{d}/{n}' if d else n for d, n in found]


def load_images(paths: Sequence[str], image_size: Sequence[int],
                num_workers: int = 4):
  """Decodes files in a thread pool (PIL releases the GIL while decoding).

  Returns (images, errors): uint8 (N, H, W, 3) with zeros for unreadable
  files, and {index: reason} for those files.
  """
  images = np.zeros((len(paths), *image_size, 3), np.uint8)
  errors = {}

  def load(i):
    image, reason = decode(paths[i], image_size)
    if image is None:
      errors[i] = reason
    else:
      images[i] = image

  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    list(pool.map(load, range(len(paths))))
  return images, errors
