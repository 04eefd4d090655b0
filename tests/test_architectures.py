"""The shortcuts, width and mobilenet_alpha experiments: MobileNet's alpha^2 cost
from the networks themselves, the verdicts on made-up results, and a tiny sweep
of each read by `launch.py report` and notebooks/architectures.ipynb."""
import pandas as pd
import pytest

import arch
from conftest import TINY, execute_notebook, launch
from experiments import mobilenet_alpha, shortcuts, width

ALPHAS = (0.75, 0.5, 0.25)


def costs(model, input_shape):
  net = arch.build({k: v for k, v in model.items() if k != 'input_shape'})
  return arch.count_params(net, input_shape)['params'], arch.count_macs(net, input_shape)


def test_mobilenet_cost_falls_as_alpha_squared():
  """Params and mult-adds of the digits net at each alpha, over alpha 1's, lie in
  [alpha^2, 1.3 alpha^2]. Not exact: the stem, the depthwise convs, the BN
  parameters and the classifier scale as alpha, not alpha^2 (25% above alpha^2 at
  alpha 0.25, where they weigh most). int(c * alpha) rounds no channel here."""
  config = mobilenet_alpha.get_config()
  base = costs(config.model, config.model.input_shape)
  for alpha in ALPHAS:
    for cost, full in zip(costs(dict(config.model, alpha=alpha), config.model.input_shape), base):
      assert alpha**2 <= cost / full <= 1.3 * alpha**2, (alpha, cost, full)


def test_published_mobilenet_matches_table_6():
  """The published net at 224: the paper's mult-adds (569M, 325M, 149M, 41M) and
  parameters (4.2M, 2.6M, 1.3M, 0.5M) to the paper's rounding."""
  table_6 = {1.0: (4.2e6, 569e6), 0.75: (2.6e6, 325e6), 0.5: (1.3e6, 149e6), 0.25: (0.5e6, 41e6)}
  for alpha, (params, macs) in table_6.items():
    counted = costs(dict(name='mobilenet', alpha=alpha), (224, 224, 3))
    assert abs(counted[0] - params) <= 0.05e6 and abs(counted[1] - macs) <= 0.5e6, (alpha, counted)


def test_configs_and_sweeps():
  assert mobilenet_alpha.get_config().model.num_blocks == 5
  assert mobilenet_alpha.get_config('cifar10').model.num_blocks == 13  # the published net
  assert mobilenet_alpha.get_config('alpha=0.5').model.alpha == 0.5
  assert width.get_config().model.depth == width.DEPTH
  assert width.get_config('depth=20').model.depth == 20
  assert len(shortcuts.get_sweep('seeds=2')) == 16 and len(width.get_sweep()) == 8
  assert [m['model.alpha'] for m in mobilenet_alpha.get_sweep('seeds=1')] == [1.0, 0.75, 0.5, 0.25]
  assert len(mobilenet_alpha.get_sweep()) == 12  # seeds 0-2
  for experiment in (shortcuts, width, mobilenet_alpha):
    with pytest.raises(ValueError, match='wdith'):
      experiment.get_config('wdith=2')
  with pytest.raises(ValueError, match='stem_strides'):
    arch.build(dict(name='mobilenet', stem_strides=3))


def made_up(members, error, status='done'):
  """A `runs` frame as arch.analysis.load gives: one done run per member."""
  rows = [dict(m, run=str(m), status=status, train_error=0.0, test_error=error(m),
               params=1000 * m.get('model.alpha', m.get('model.width', 1)) ** 2,
               macs=9000 * m.get('model.alpha', m.get('model.width', 1)) ** 1.9) for m in members]
  return pd.DataFrame(rows)


def test_shortcuts_verdict():
  members = shortcuts.get_sweep()
  plain56 = lambda m: 0.45 if m['model.shortcut'] == 'none' and m['model.depth'] == 56 else 0.01
  assert shortcuts.verdict(made_up(members, plain56)).startswith('agrees: depth 56 test error none 45.00, A 1.00')
  b_worse = lambda m: 0.05 if m['model.shortcut'] == 'B' else plain56(m)
  assert shortcuts.verdict(made_up(members, b_worse)).startswith('disagrees:')
  assert shortcuts.verdict(made_up(members[1:], plain56)).startswith('inconclusive:')
  assert shortcuts.verdict(made_up(members, plain56, 'running')).startswith('inconclusive:')


def test_width_verdict():
  members = width.get_sweep()
  assert width.verdict(made_up(members, lambda m: 0.04 / m['model.width'])).startswith('agrees:')
  assert width.verdict(made_up(members, lambda m: 0.01 * m['model.width'])).startswith('disagrees:')
  assert width.verdict(made_up(members, lambda m: 0.01)).startswith('inconclusive:')
  assert 'params ~ k^2.00' in width.verdict(made_up(members, lambda m: 0.01))


def test_mobilenet_alpha_verdict():
  members = mobilenet_alpha.get_sweep()
  line = mobilenet_alpha.verdict(made_up(members, lambda m: 0.02 / m['model.alpha']))
  assert line.startswith('agrees: mult-adds ~ alpha^1.90, params ~ alpha^2.00'), line
  assert mobilenet_alpha.verdict(made_up(members, lambda m: 0.01)).startswith('inconclusive:')
  reversed_ = made_up(members, lambda m: 0.02 * m['model.alpha'])
  assert mobilenet_alpha.verdict(reversed_).startswith('disagrees:')
  linear_cost = reversed_.assign(macs=reversed_['model.alpha'], test_error=0.01)
  assert 'not roughly alpha^2' in mobilenet_alpha.verdict(linear_cost)
  assert mobilenet_alpha.verdict(made_up(members[:2], lambda m: 0.01)).startswith('inconclusive:')


# Two members of each experiment, 20 steps of batch 32: the ResNets at TINY's
# depth 8, so they never reach the verdicts' members (inconclusive).
TINY_RUN = ','.join(i for i in TINY.split(',') if i.split('=')[0] not in ('depth', 'width'))
TINY_SWEEPS = {
    'shortcuts': (TINY, [{'model.shortcut': 'A'}, {'model.shortcut': 'B'}]),
    'width': (TINY, [{'model.width': 0.5}, {'model.width': 1.0}]),
    'mobilenet_alpha': (TINY_RUN, [{'model.alpha': 0.5}, {'model.alpha': 0.25}]),
}
WRAPPER = '''
from experiments import {name} as experiment
CLAIM, verdict = experiment.CLAIM, experiment.verdict

def get_config(arg=''):
  return experiment.get_config({arg!r})

def get_sweep(arg=''):
  return {members!r}
'''


@pytest.fixture(scope='module')
def runs_dir(tmp_path_factory):
  """RUNS_DIR/<name> for each experiment above, made by `launch.py sweep`."""
  runs_dir, files = tmp_path_factory.mktemp('runs'), tmp_path_factory.mktemp('experiments')
  for name, (arg, members) in TINY_SWEEPS.items():
    path = files / f'{name}.py'
    path.write_text(WRAPPER.format(name=name, arg=arg, members=members))
    proc = launch('sweep', f'--config={path}', '--workdir', runs_dir / name, '--workers', 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return runs_dir


def test_report_prints_the_verdict(runs_dir):
  proc = launch('report', '--workdir', runs_dir / 'mobilenet_alpha')
  assert proc.returncode == 0, proc.stderr
  assert 'inconclusive: no runs of model.alpha=0.75, 1.0' in proc.stdout
  table = pd.read_csv(runs_dir / 'mobilenet_alpha' / 'summary.csv')
  assert set(table['step']) == {20} and (table['wall_s'] > 0).all()


def test_architectures_notebook(runs_dir):
  nb, images = execute_notebook('architectures.ipynb', f'RUNS_DIR = {str(runs_dir)!r}')
  text = ''.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', ''))
                 for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
  for name in ('bottleneck', 'factorization', 'separable'):
    assert f'{name}: skipped' in text
  assert 'inconclusive:' in text
  assert len(images) == 1 + len(TINY_SWEEPS)  # the Pareto plots, then a panel per claim
