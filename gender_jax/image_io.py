"""Decode any image file to the model's RGB uint8 (H, W, 3) input.

One decode shared by data preparation and the labeller, so that images seen
at labelling time are converted and resized exactly like the training images:
PIL decode (first frame) -> EXIF orientation (`PIL.ImageOps.exif_transpose`:
a phone photo is seen upright) -> 8-bit RGB for every PIL mode (`to_rgb`) ->
framing (`frame`: face box and margin; 'stretch', 'crop' or 'pad' to the
model's aspect) -> bilinear resize. `decode` never raises: an unreadable file
gives a one-line reason instead.
"""

import collections
import concurrent.futures
import csv
import math
import os
import stat
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageOps

# Extensions the labeller picks up (lower case; matching is case-insensitive).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm')
RESIZE_MODES = ('stretch', 'crop', 'pad')
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT, _TIFF_SIGNED = 339, 2


def _tiff_tag(image: Image.Image, tag: int):
  """First value of a TIFF tag, or None (not a TIFF, or no such tag)."""
  value = getattr(image, 'tag_v2', {}).get(tag)
  return value[0] if isinstance(value, tuple) and value else value


def _integer_bits(image: Image.Image) -> int:
  """Value bits of the data in a mode 'I*' image (see `to_rgb`)."""
  if image.mode.startswith('I;16'):
    return 16
  bits = _tiff_tag(image, _TIFF_BITS_PER_SAMPLE)
  if not bits or not 8 <= int(bits) <= 32:
    return 16
  return int(bits) - (_tiff_tag(image, _TIFF_SAMPLE_FORMAT) == _TIFF_SIGNED)


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB version of a PIL image of any mode, by mode:

  - L, 1, P, RGB, CMYK, YCbCr, ...: PIL's `convert('RGB')` (CMYK naively,
    (255 - C) * (255 - K) / 255, no ICC profile).
  - 16-bit grey (I;16, I;16B, I;16L, I;16N): value >> 8 (0..65535 ->
    0..255). PIL's own conversion clips these at 255 (an almost white face).
  - I (32-bit signed integers): PIL's container for deeper integer data;
    scaled by the file's bit depth: TIFF's BitsPerSample when present
    (less its sign bit for signed samples: a 32-bit signed TIFF holds
    0..2**31 - 1), otherwise 16 (PIL decodes 16-bit PGM/PPM into I): clip
    to 0..2**bits - 1, then >> (bits - 8).
  - F (32-bit float): values in 0..1 (max <= 1) are scaled by 255, others
    are taken as 0..255; then rounded and clipped to 0..255 (NaN -> 0).
  - Alpha (RGBA, LA, PA, RGBa, a palette or grey/RGB image with a
    'transparency' entry): composited over black, i.e. colour * alpha / 255.
    Fully transparent pixels become black whatever colour they hide, and
    opaque pixels are unchanged; where the hidden colour is black (what most
    writers store) this equals `tf.image.decode_png(channels=3)` and Keras's
    `load_img`, which drop alpha.
  """
  if image.mode == 'RGB':
    return image
  if image.mode == 'I' or image.mode.startswith('I;16'):
    bits = _integer_bits(image)
    values = np.clip(np.asarray(image).astype(np.int64), 0, (1 << bits) - 1)
    grey = (values >> (bits - 8)).astype(np.uint8)
    return Image.fromarray(grey, 'L').convert('RGB')
  if image.mode == 'F':
    values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0)
    if values.size and values.max() <= 1:
      values = values * 255
    grey = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    return Image.fromarray(grey, 'L').convert('RGB')
  if image.has_transparency_data:
    rgba = image.convert('RGBA')
    black = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert('RGB')
  return image.convert('RGB')


def box_region(box: Sequence[float], margin: float, size: Tuple[int, int]):
  """PIL crop box (left, top, right, bottom) of face box (x, y, w, h) grown by
  `margin` times its width and height on every side, clipped to the image
  `size` = (width, height)."""
  x, y, w, h = (float(v) for v in box)
  if w <= 0 or h <= 0:
    raise ValueError(f'face box {tuple(box)}: width and height must be > 0')
  left, top = max(0.0, x - margin * w), max(0.0, y - margin * h)
  right = min(float(size[0]), x + w + margin * w)
  bottom = min(float(size[1]), y + h + margin * h)
  if right - left < 1 or bottom - top < 1:
    raise ValueError(f'face box {tuple(box)} lies outside the '
                     f'{size[0]}x{size[1]} image')
  return (round(left), round(top), max(round(right), round(left) + 1),
          max(round(bottom), round(top) + 1))


def frame(image: Image.Image, image_size: Sequence[int],
          resize: str = 'stretch', box: Optional[Sequence[float]] = None,
          box_margin: float = 0.0) -> Image.Image:
  """The region of an RGB image the model sees, at `image_size` = (H, W).

  `box` (x, y, w, h pixels) first cuts out the face grown by `box_margin`;
  `resize`: 'stretch' (the original's: the whole image, its aspect
  distorted), 'crop' (the largest centred region of the model's aspect) or
  'pad' (the whole image, centred on black bars).
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f'resize={resize!r}: expected one of {RESIZE_MODES}')
  height, width = image_size
  if box is not None:
    image = image.crop(box_region(box, box_margin, image.size))
  w, h = image.size
  if resize == 'crop' and w * height != h * width:
    if w * height > h * width:           # Too wide: keep the centre columns.
      new_w = max(1, round(h * width / height))
      left = (w - new_w) // 2
      image = image.crop((left, 0, left + new_w, h))
    else:
      new_h = max(1, round(w * height / width))
      top = (h - new_h) // 2
      image = image.crop((0, top, w, top + new_h))
  elif resize == 'pad' and w * height != h * width:
    new_w = max(w, round(h * width / height))
    new_h = max(h, round(w * height / width))
    canvas = Image.new('RGB', (new_w, new_h))
    canvas.paste(image, ((new_w - w) // 2, (new_h - h) // 2))
    image = canvas
  if image.size != (width, height):
    image = image.resize((width, height), Image.BILINEAR)
  return image


def to_model_input(image: Image.Image, image_size: Sequence[int],
                   resize: str = 'stretch',
                   box: Optional[Sequence[float]] = None,
                   box_margin: float = 0.0) -> np.ndarray:
  """8-bit RGB conversion and framing of a PIL image: uint8 (H, W, 3)."""
  return np.asarray(frame(to_rgb(image), image_size, resize, box, box_margin),
                    dtype=np.uint8)


def load_image(path: str, image_size: Sequence[int], resize: str = 'stretch',
               box: Optional[Sequence[float]] = None,
               box_margin: float = 0.0) -> np.ndarray:
  """Reads `path` and returns uint8 (H, W, 3) at `image_size` = (H, W).

  Applies the EXIF orientation, then `frame`. Raises OSError/ValueError
  (PIL's) for unreadable, truncated or non-image files; `decode` turns them
  into reasons.
  """
  with Image.open(path) as image:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_model_input(image, image_size, resize, box, box_margin)


def _box_key(path: str) -> str:
  """A box file's lookup key: '/'-separated, no leading './', no extension."""
  path = path.strip().replace('\\', '/')
  while path.startswith('./'):
    path = path[2:]
  return os.path.splitext(path)[0]


def read_boxes(path: str) -> Dict[str, Tuple[float, float, float, float]]:
  """{image key: (x, y, w, h)} of a face-box CSV `path,x,y,w,h` (pixels).

  A header line is optional; VGGFace2's `loose_bb_*.csv` (NAME_ID, X, Y, W,
  H, paths without extension) reads as it is. Paths are relative to the
  images folder; `find_box` looks an image up with or without extension.
  ValueError names the line of a bad row.
  """
  boxes = {}
  with open(path, newline='', encoding='utf-8-sig',
            errors='surrogateescape') as f:
    for n, row in enumerate(csv.reader(f), 1):
      if not row or not ''.join(row).strip():
        continue
      try:
        if len(row) != 5:
          raise ValueError('expected path,x,y,w,h')
        values = tuple(float(v) for v in row[1:])
      except ValueError as e:
        if n == 1 and len(row) == 5:
          continue                           # A header.
        raise ValueError(f'{path}, line {n}: {e}') from None
      if not all(map(math.isfinite, values)) or min(values[2:]) <= 0:
        raise ValueError(f'{path}, line {n}: x and y must be numbers, width '
                         'and height numbers > 0')
      boxes[_box_key(row[0])] = values
  if not boxes:
    raise ValueError(f'{path}: no face boxes (rows path,x,y,w,h).')
  return boxes


def find_box(boxes: Optional[Dict[str, tuple]], rel_path: str):
  """The box of the image at `rel_path` (relative to the images folder), or
  None when `boxes` is None or lists no box for it."""
  if boxes is None:
    return None
  return boxes.get(_box_key(rel_path))


def error_reason(error: BaseException) -> str:
  """A one-line reason for a failed decode, for CSV error columns."""
  text = ' '.join(str(error).split()) or 'no message'
  return f'{type(error).__name__}: {text}'


def decode(path: str, image_size: Sequence[int], resize: str = 'stretch',
           box: Optional[Sequence[float]] = None, box_margin: float = 0.0
           ) -> Tuple[Optional[np.ndarray], str]:
  """`load_image` that never raises: (uint8 (H, W, 3), '') or (None, reason).

  The one decode of data preparation, the labeller and `decode_batches`; the
  reason is `error_reason`'s 'ErrorType: message'. Empty files, folders,
  other non-regular files (a FIFO would block the reader), broken symbolic
  links and symbolic-link loops get a reason before PIL opens anything.
  """
  try:
    try:
      mode = os.stat(path)
    except FileNotFoundError:
      if not os.path.islink(path):
        raise
      raise FileNotFoundError(
          f'broken symbolic link to {os.readlink(path)!r}') from None
    if stat.S_ISDIR(mode.st_mode):
      raise IsADirectoryError('a folder, not an image file')
    if not stat.S_ISREG(mode.st_mode):
      raise ValueError('not a regular file')
    if mode.st_size == 0:
      raise ValueError('empty file (0 bytes)')
    return load_image(path, image_size, resize, box, box_margin), ''
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


def decode_batches(paths: Sequence[str], image_size: Sequence[int],
                   batch_size: int, num_workers: int = 4, prefetch: int = 2,
                   *, resize: str = 'stretch',
                   boxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
                   box_margin: float = 0.0
                   ) -> Iterator[Tuple[np.ndarray, List[str]]]:
  """Yields (images, reasons) per `batch_size` paths, in order, decoded ahead.

  `images` is uint8 (n, H, W, 3), zeros for an unreadable file, and
  `reasons` one `decode` reason per path ('' when it decoded). Up to
  `prefetch` batches beyond the one yielded are being decoded meanwhile by
  `num_workers` threads (PIL releases the GIL while decoding; tf.data and
  grain measured no faster). `resize`, `boxes` (a face box or None per path)
  and `box_margin` frame each image as `decode` does.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = collections.deque()
    starts = iter(range(0, len(paths), batch_size))

    def submit():
      start = next(starts, None)
      if start is not None:
        pending.append([
            pool.submit(decode, paths[i], image_size, resize,
                        boxes[i] if boxes is not None else None, box_margin)
            for i in range(start, min(start + batch_size, len(paths)))])

    for _ in range(prefetch + 1):
      submit()
    while pending:
      futures = pending.popleft()
      submit()
      images = np.zeros((len(futures), *image_size, 3), np.uint8)
      reasons = []
      for i, future in enumerate(futures):
        image, reason = future.result()
        if image is not None:
          images[i] = image
        reasons.append(reason)
      yield images, reasons


def load_images(paths: Sequence[str], image_size: Sequence[int],
                num_workers: int = 4, resize: str = 'stretch',
                boxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
                box_margin: float = 0.0):
  """`decode_batches` of all `paths` in one batch: (images, errors).

  images: uint8 (N, H, W, 3) with zeros for unreadable files; errors:
  {index: reason} for those files.
  """
  images, reasons = next(
      decode_batches(paths, image_size, max(1, len(paths)), num_workers,
                     resize=resize, boxes=boxes, box_margin=box_margin),
      (np.zeros((0, *image_size, 3), np.uint8), []))
  return images, {i: reason for i, reason in enumerate(reasons) if reason}
