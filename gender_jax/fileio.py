"""Files written whole or not at all (results, configs, reports, sidecars)."""

import contextlib
import json
import os
from typing import Any, Union


def write_atomic(path: str, data: Union[str, bytes]) -> None:
  """Writes `data` to `path` through a temporary file beside it, renamed over
  `path` once complete: a full disk or a kill leaves the old file (or none)
  and no temporary, never a half-written file that blocks a rerun."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, data: Any, **kwargs) -> None:
  """`write_atomic` of `data` as indented JSON (`kwargs` go to json.dumps)."""
  write_atomic(path, json.dumps(data, indent=2, **kwargs))
