"""Sweeps end to end on a tiny experiment: expansion, failure isolation, skip-done,
submitit's local executor, the report, and the notebooks executed against it."""
import json

import pandas as pd
import pytest

from arch import sweep
from conftest import DEGRADATION, TINY, assert_one_line_error, execute_notebook, launch

# Depth 8 and 14, plain and option A, and one member whose loss diverges.
TINY_EXPERIMENT = f'''
import importlib.util
spec = importlib.util.spec_from_file_location('degradation', {DEGRADATION!r})
degradation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(degradation)

def get_config(arg=''):
  return degradation.get_config({TINY!r})

def get_sweep(arg=''):
  members = [{{'model.depth': d, 'model.shortcut': s}} for d in (8, 14) for s in ('none', 'A')]
  if arg == 'with_failure':
    members.append({{'model.depth': 8, 'model.shortcut': 'A', 'schedule.lr': 1e30}})
  return members
'''
NAMES = ['depth=8,shortcut=none', 'depth=8,shortcut=A', 'depth=14,shortcut=none',
         'depth=14,shortcut=A']
FAILING = 'depth=8,shortcut=A,lr=1e+30'


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  path = tmp_path_factory.mktemp('experiments') / 'tiny.py'
  path.write_text(TINY_EXPERIMENT)
  return str(path)


@pytest.fixture(scope='module')
def swept(experiment, tmp_path_factory):
  """A sweep with one failing member, run once by the local launcher."""
  workdir = tmp_path_factory.mktemp('sweep')
  proc = launch('sweep', f'--config={experiment}:with_failure', '--workdir', workdir,
                '--workers', 2, timeout=600)
  return workdir, proc


def test_grids_and_names():
  grid = sweep.product(**{'model.depth': [20, 56], 'seed': [0, 1]})
  assert grid == [{'model.depth': 20, 'seed': 0}, {'model.depth': 20, 'seed': 1},
                  {'model.depth': 56, 'seed': 0}, {'model.depth': 56, 'seed': 1}]
  assert sweep.zipped(a=[1, 2], b=[3, 4]) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  with pytest.raises(ValueError, match='differ in length'):
    sweep.zipped(a=[1], b=[3, 4])
  assert sweep.member_name({'model.depth': 56, 'model.shortcut': 'none', 'seed': 1}) == \
      'depth=56,shortcut=none,seed=1'
  # Leaves that collide keep their full keys.
  assert sweep.member_name({'model.width': 2, 'data.width': 3}) == 'model.width=2,data.width=3'


def test_degradation_sweep_expands():
  members = sweep.expand(f'{DEGRADATION}:seeds=3')
  assert len(members) == 24
  names = {m['name'] for m in members}
  assert 'depth=56,shortcut=none,seed=2' in names and 'depth=20,shortcut=A,seed=0' in names
  assert {m['overrides']['model.shortcut'] for m in members} == {'none', 'A'}


def test_dry_run_prints_members_and_writes_nothing(experiment, tmp_path):
  proc = launch('sweep', f'--config={experiment}', '--workdir', tmp_path / 'w', '--dry_run')
  assert proc.returncode == 0, proc.stderr
  assert all(name in proc.stdout for name in NAMES)
  assert not (tmp_path / 'w').exists()


def test_bad_member_key_is_caught_at_dry_run(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(TINY_EXPERIMENT.replace("'model.shortcut': s", "'model.shortcutt': s"))
  proc = launch('sweep', f'--config={bad}', '--workdir', tmp_path / 'w', '--dry_run')
  assert_one_line_error(proc, 'model.shortcutt')
  assert not (tmp_path / 'w').exists()


def test_failure_is_isolated(swept):
  workdir, proc = swept
  assert proc.returncode == 1, proc.stdout + proc.stderr
  record = json.loads((workdir / 'sweep.json').read_text())
  status = {m['name']: m['status'] for m in record['members']}
  assert status == {**{n: 'done' for n in NAMES}, FAILING: 'failed'}
  failed = next(m for m in record['members'] if m['name'] == FAILING)
  assert 'loss is' in failed['reason']
  for name in NAMES:
    summary = json.loads((workdir / name / 'summary.json').read_text())
    assert summary['status'] == 'done' and 0 <= summary['train_error'] <= 1


def test_rerun_skips_done_members(experiment, swept):
  workdir, _ = swept
  logs = {n: (workdir / n / 'train.log').read_text() for n in NAMES}
  proc = launch('sweep', f'--config={experiment}:with_failure', '--workdir', workdir)
  assert proc.returncode == 1  # the diverging member fails again
  for name in NAMES:  # nothing ran again in the done members
    assert (workdir / name / 'train.log').read_text() == logs[name]


def test_report(swept):
  workdir, _ = swept
  proc = launch('report', '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  table = pd.read_csv(workdir / 'summary.csv')
  assert len(table) == 5
  assert {'model.depth', 'model.shortcut', 'status', 'train_error', 'test_error', 'params',
          'macs'} <= set(table.columns)
  done = table[table['status'] == 'done']
  # Plain and option-A nets of equal depth have the same parameters.
  assert done.groupby('model.depth')['params'].nunique().eq(1).all()
  assert (workdir / 'report.png').stat().st_size > 10_000
  assert 'depth' in proc.stdout and 'train_error' in proc.stdout


def test_submitit_local_executor(experiment, tmp_path):
  """The SLURM path, through submitit's local executor: same submission code."""
  proc = launch('sweep', f'--config={experiment}', '--workdir', tmp_path, '--launcher', 'slurm',
                '--slurm_cluster', 'local', timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  record = json.loads((tmp_path / 'sweep.json').read_text())
  assert {m['status'] for m in record['members']} == {'done'}
  assert (tmp_path / 'submitit').is_dir()


@pytest.mark.parametrize('notebook', ['degradation.ipynb'])
def test_notebook_runs(swept, notebook):
  workdir, _ = swept
  _, images = execute_notebook(notebook, f'SWEEP_DIR = {str(workdir)!r}')
  assert len(images) >= 3
