"""Script start-up helpers: one-line user errors with exit status 2."""

import os
import subprocess
import sys
import textwrap

import pytest

from gender_jax import cli

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'configs')


def test_user_errors_become_one_line_and_status_2(capsys):
  with pytest.raises(SystemExit) as e:
    with cli.user_errors('/x/prog.py', FileNotFoundError):
      raise FileNotFoundError('no such\nfile')
  assert e.value.code == 2
  assert capsys.readouterr().err == 'prog.py: error: no such file\n'
  with pytest.raises(KeyError):      # Our bugs keep their tracebacks.
    with cli.user_errors('prog.py'):
      raise KeyError('bug')


def _run_flags(*args):
  script = textwrap.dedent('''
      from absl import app
      from ml_collections import config_flags
      from gender_jax import cli
      CONFIG = config_flags.DEFINE_config_file('config')
      def main(argv):
        print('batch', CONFIG.value.batch_size, 'size', tuple(CONFIG.value.image_size))
      app.run(main, flags_parser=cli.parse_flags)
  ''')
  return subprocess.run(
      [sys.executable, '-c', script, f'--config={CONFIGS}/stage1.py', *args],
      capture_output=True, text=True, timeout=120)


def test_command_line_overrides():
  ok = _run_flags('--config.batch_size=64', '--config.image_size=112,96')
  assert ok.returncode == 0, ok.stderr
  assert 'batch 64 size (112, 96)' in ok.stdout


@pytest.mark.parametrize('arg,needle', [
    ('--config.no_such_field=1', "unknown config field 'no_such_field' in "
     '--config.no_such_field=1;'),
    ('--config.aug.no_such=1', "'no_such'"),
    ('--config.bach_size=1', "'bach_size' in --config.bach_size=1 "
     "(did you mean 'batch_size'?)"),
    ('--config.batch_size=abc', 'config.batch_size'),
    ('--confg.batch_size=1', 'confg.batch_size'),
])
def test_bad_overrides_fail_naming_the_key(arg, needle):
  bad = _run_flags(arg)
  assert bad.returncode == 2
  assert needle in bad.stderr
  assert 'Traceback' not in bad.stderr
  assert '\\' not in bad.stderr   # No doubly quoted text.


def test_missing_config_file_is_one_line():
  bad = _run_flags(f'--config={CONFIGS}/nosuch.py')
  assert bad.returncode == 2
  assert bad.stderr.count('\n') == 1 and 'Traceback' not in bad.stderr
  assert f'cannot load --config={CONFIGS}/nosuch.py: [Errno 2]' in bad.stderr


@pytest.mark.parametrize('error,needle', [
    (OSError(28, 'No space left on device', '/out/x.csv'),
     '/out/x.csv: No space left on device (the disk is full'),
    (IsADirectoryError(21, 'Is a directory', '/images'),
     '/images: Is a directory (it is a directory: give a file path)'),
    (PermissionError(13, 'Permission denied', '/ro/x.onnx'),
     '/ro/x.onnx: Permission denied (no permission'),
    (ValueError('tensorstore write failed: No space left on device [x]'),
     'No space left on device while writing (tensorstore'),
])
def test_disk_and_path_errors_are_one_line(capsys, error, needle):
  with pytest.raises(SystemExit) as e:
    with cli.user_errors('prog.py'):
      try:
        raise error
      except Exception as inner:
        raise RuntimeError('wrapped by a library') from inner
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and needle in err


def test_file_in_the_way_of_a_folder(capsys, tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  with pytest.raises(SystemExit):
    with cli.user_errors('prog.py'):
      os.makedirs(blocker)
  assert f'{blocker} is a file where a folder is needed' in (
      capsys.readouterr().err)
  with pytest.raises(SystemExit):
    with cli.user_errors('prog.py'):
      os.makedirs(blocker / 'sub')
  assert 'a part of the path is a file, not a folder' in (
      capsys.readouterr().err)


def test_other_os_errors_keep_their_traceback():
  with pytest.raises(ConnectionResetError):
    with cli.user_errors('prog.py'):
      raise ConnectionResetError(104, 'reset')
