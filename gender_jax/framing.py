"""How the labeller frames each image: the training data's framing.

`resize` (stretch|crop|pad) and, with a face-box CSV, `box_margin` default to
what `scripts/prepare_data.py` recorded in the training dataset's
metadata.json (else 'stretch' and 0, as the original), so that labelled
images meet the model as its training images did; an image with a box
(looked up by its path relative to the images folder) is cut to it first,
by `image_io.decode`. Read without importing TensorFlow.
"""

import dataclasses
import json
import os
from typing import List, Optional, Sequence, Tuple

from gender_jax import errors
from gender_jax import image_io

# `dataset.dataset_dir`'s metadata.json, relative to a data_dir: restated here
# because importing `gender_jax.dataset` starts TensorFlow.
DATASET_METADATA = os.path.join('gender_faces', '1.0.0', 'metadata.json')


class FramingError(errors.UserError, ValueError):
  """A bad --resize, --box_margin or --boxes; the message says which."""


@dataclasses.dataclass(frozen=True)
class Framing:
  """How each image meets the model's input (`image_io.frame`)."""
  resize: str = 'stretch'
  box_margin: float = 0.0
  boxes: Optional[str] = None      # The face-box CSV ...
  table: Optional[dict] = None     # ... and its boxes (`image_io.read_boxes`).

  def box(self, rel_path: str):
    """The face box of the image at `rel_path` (under the images folder)."""
    return image_io.find_box(self.table, rel_path)

  def boxes_of(self, rel_paths: Sequence[str]) -> Optional[List]:
    """The box (or None) of each of `rel_paths`; None without a box file."""
    return [self.box(p) for p in rel_paths] if self.table else None


def _dataset_framing(data_dir: str) -> Tuple[dict, str]:
  """(resize and box_margin recorded in the training dataset's metadata,
  the metadata's path); ({}, path) when there is none to read."""
  path = os.path.join(data_dir, DATASET_METADATA)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return {}, path
  return {k: meta[k] for k in ('resize', 'box_margin') if k in meta}, path


def resolve_framing(config, resize: Optional[str] = None,
                    boxes: Optional[str] = None,
                    box_margin: Optional[float] = None
                    ) -> Tuple[Framing, str]:
  """The run's `Framing` and one line saying where it comes from.

  `resize` and `box_margin` left None are the training dataset's (its
  metadata.json under `config.data_dir`), else 'stretch' and 0.
  FramingError for an unknown mode, a negative margin or an unreadable box
  file.
  """
  recorded, meta_path = _dataset_framing(config.get('data_dir') or '')
  values, origins = {}, {}
  for key, given, default in (('resize', resize, 'stretch'),
                              ('box_margin', box_margin, 0.0)):
    if given is not None:
      values[key], origins[key] = given, 'given'
    elif key in recorded:
      values[key], origins[key] = recorded[key], f'training data {meta_path}'
    else:
      values[key], origins[key] = default, 'default'
  if values['resize'] not in image_io.RESIZE_MODES:
    raise FramingError(f'--resize={values["resize"]!r}: expected one of '
                       f'{"|".join(image_io.RESIZE_MODES)}.')
  if values['box_margin'] < 0:
    raise FramingError(
        f'--box_margin={values["box_margin"]}: expected >= 0.')
  line = f'Framing: resize={values["resize"]} ({origins["resize"]})'
  if not boxes:
    return Framing(values['resize']), line + ', no face boxes.'
  try:
    table = image_io.read_boxes(boxes)
  except (OSError, ValueError) as e:
    raise FramingError(f'--boxes: {e}') from e
  line += (f', {len(table)} face boxes from {boxes}, box_margin='
           f'{values["box_margin"]} ({origins["box_margin"]}).')
  return Framing(values['resize'], float(values['box_margin']),
                 os.path.abspath(boxes), table), line
