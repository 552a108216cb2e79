"""Tests of gender_jax.cpu: the huge-page malloc re-exec and its guards."""

import os
import subprocess
import sys

from gender_jax import cpu


def test_tunables_env_adds_the_tunable_once(monkeypatch):
  monkeypatch.setattr(cpu, 'transparent_hugepages_available', lambda: True)
  monkeypatch.setattr(cpu.platform, 'libc_ver', lambda: ('glibc', '2.36'))
  monkeypatch.setattr(cpu.sys, 'platform', 'linux')
  env = cpu.tunables_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:' + cpu.MALLOC_TUNABLES)
  assert cpu.tunables_env({}) == {'GLIBC_TUNABLES': cpu.MALLOC_TUNABLES}
  # Already set (by us or the user, any value), or disabled: no change.
  assert cpu.tunables_env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
  assert cpu.tunables_env({cpu.NO_REEXEC_ENV: '1'}) is None
  monkeypatch.setattr(cpu, 'transparent_hugepages_available', lambda: False)
  assert cpu.tunables_env({}) is None


def test_reexec_keeps_the_command_line(tmp_path):
  script = tmp_path / 'probe.py'
  script.write_text(
      'import os, sys\n'
      'from gender_jax import cpu\n'
      'print("start", sys.argv[1:], flush=True)\n'
      'cpu.reexec_with_malloc_tunables()\n'
      'print("tunables", os.environ.get("GLIBC_TUNABLES", ""))\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', cpu.NO_REEXEC_ENV)}
  out = subprocess.run([sys.executable, str(script), 'a', '--b=1'], env=env,
                       capture_output=True, text=True, check=True).stdout
  lines = out.splitlines()
  expected = cpu.tunables_env(env)
  if expected is None:                     # No glibc/THP here: runs once.
    assert lines == ["start ['a', '--b=1']", 'tunables ']
  else:                                    # Re-executed once, same args.
    assert lines == ["start ['a', '--b=1']", "start ['a', '--b=1']",
                     f'tunables {expected["GLIBC_TUNABLES"]}']


def test_xla_flags_env_appends_once_and_respects_the_user(monkeypatch):
  monkeypatch.setattr(cpu, 'jaxlib_version', lambda: (0, 10, 2))
  flag = cpu.XLA_CPU_FLAGS[0]
  name = flag.split('=', 1)[0]
  assert cpu.xla_flags_env({}) == ' '.join(cpu.XLA_CPU_FLAGS)
  assert cpu.xla_flags_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}) == (
      '--xla_force_host_platform_device_count=8 ' + ' '.join(cpu.XLA_CPU_FLAGS))
  assert cpu.xla_flags_env({'XLA_FLAGS': f'{name}=dot'}) is None
  assert cpu.xla_flags_env({'XLA_FLAGS': ' '.join(cpu.XLA_CPU_FLAGS)}) is None


def test_xla_flags_only_for_known_jaxlib_versions(monkeypatch):
  """XLA aborts on an unknown flag: outside the known range nothing is added."""
  for version, known in (((0, 10, 2), True), ((0, 10, 9), True),
                         ((0, 10, 1), False), ((0, 11, 0), False),
                         ((1, 0, 0), False), (None, False)):
    monkeypatch.setattr(cpu, 'jaxlib_version', lambda v=version: v)
    assert cpu.xla_cpu_flags_supported(version) == known
    env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    expected = ('--xla_force_host_platform_device_count=8 ' +
                ' '.join(cpu.XLA_CPU_FLAGS)) if known else None
    assert cpu.xla_flags_env(env) == expected
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    cpu.set_xla_flags()
    assert os.environ.get('XLA_FLAGS', '') == (
        ' '.join(cpu.XLA_CPU_FLAGS) if known else '')


def test_jaxlib_version_reads_the_package_metadata(monkeypatch):
  import jaxlib  # pylint: disable=g-import-not-at-top
  assert cpu.jaxlib_version() == tuple(
      int(v) for v in jaxlib.__version__.split('.')[:3])
  monkeypatch.setattr(cpu.metadata, 'version', lambda _: '0.10.2.dev20260101')
  assert cpu.jaxlib_version() == (0, 10, 2)
  def missing(name):
    raise cpu.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(cpu.metadata, 'version', missing)
  assert cpu.jaxlib_version() is None


def test_importing_the_package_sets_flags_the_installed_xla_accepts():
  """The flags are set for this jaxlib, and its CPU backend starts with them
  (an unknown flag would abort the process)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [sys.executable, '-c', 'import os, gender_jax, jax; jax.devices(); '
       'print(os.environ.get("XLA_FLAGS", ""))'],
      env=env, capture_output=True, text=True, check=True).stdout
  known = cpu.xla_cpu_flags_supported(cpu.jaxlib_version())
  assert out.split() == (list(cpu.XLA_CPU_FLAGS) if known else [])
