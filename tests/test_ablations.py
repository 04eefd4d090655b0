"""The Inception/Xception ablation nets (arch/small.py) and their experiment files.

Cost only, no training: every claim about mult-adds is checked on the networks
themselves (per block, from `arch.cost.summary_rows`) against the number the
paper's arithmetic gives from the blocks' channel fields.
"""
import functools
import itertools

import pandas as pd
import pytest

import arch
from arch import small
from conftest import assert_one_line_error, launch
from experiments import bottleneck, factorization, separable

DIGITS = (8, 8, 1)
EXPERIMENTS = (bottleneck, factorization, separable)


@functools.lru_cache(maxsize=None)
def block_macs(name, **knobs):
  """{block name: mult-adds} of a net on one 8x8 digit."""
  rows, _ = arch.cost.summary_rows(arch.build(dict(name=name, **knobs)), DIGITS)
  return {r['name']: r['macs'] for r in rows}


def params(name, **knobs):
  return arch.count_params(arch.build(dict(name=name, **knobs)), DIGITS)['params']


def test_two_3x3_cost_18_25_of_5x5():
  full, factorized = block_macs('factorization_net', conv='5x5'), block_macs('factorization_net', conv='3x3x2')
  c = 32
  for i in range(1, 5):
    assert full[f'block{i}'] == 8 * 8 * 25 * c * c
    assert factorized[f'block{i}'] == 8 * 8 * 2 * 9 * c * c  # 18/25 of it
  assert full['stem'] == factorized['stem'] and full['head'] == factorized['head']
  saving = 1 - sum(factorized.values()) / sum(full.values())
  assert 0.27 < saving < 7 / 25  # the stem and head dilute 28% a little


def test_1x7_7x1_costs_2_over_7():
  full, factorized = block_macs('factorization_net', conv='7x7'), block_macs('factorization_net', conv='1x7+7x1')
  for i in range(1, 5):
    assert factorized[f'block{i}'] * 7 == full[f'block{i}'] * 2 == 2 * 8 * 8 * 49 * 32 * 32


def inception_macs(module, width):
  """Whole-net mult-adds of small_inception, from its modules' channel fields."""
  cin = round(192 * width)
  total = 8 * 8 * 9 * 1 * cin  # the 3x3 stem on one channel
  side = 8
  for name, (f1, f3r, f3, f5r, f5, proj) in small.inception_fields(width).items():
    side = 4 if name == '4a' else side  # the max-pool before 4a
    if module == 'naive':
      total += side * side * cin * (f1 + 9 * f3 + 25 * f5)
      cin += f1 + f3 + f5  # the pooled input passes through
    else:
      total += side * side * (cin * (f1 + f3r + f5r + proj) + 9 * f3r * f3 + 25 * f5r * f5)
      cin = f1 + f3 + f5 + proj
  return total + cin * 10  # the classifier


@pytest.mark.parametrize('width', [0.125, 0.25])
def test_reduced_inception_cost_fraction(width):
  naive = sum(block_macs('small_inception', module='naive', width=width).values())
  reduced = sum(block_macs('small_inception', module='reduced', width=width).values())
  assert naive == inception_macs('naive', width)
  assert reduced == inception_macs('reduced', width)
  # Width 1/8: 771,904 / 4,060,784 = 0.19; the naive net's width grows module by module.
  assert reduced / naive < 0.2


def test_separable_costs_one_over_n_plus_one_over_nine():
  standard = block_macs('separable_net', conv='standard')
  sep = block_macs('separable_net', conv='separable')
  n = 32
  for i in range(1, 5):
    assert standard[f'block{i}'] == 8 * 8 * 9 * n * n
    assert sep[f'block{i}'] == 8 * 8 * (9 * n + n * n)
    assert sep[f'block{i}'] * 9 * n == standard[f'block{i}'] * (9 + n)  # ratio 1/n + 1/9


def test_exact_param_counts():
  # factorization_net 5x5, 32 channels, 4 blocks (no conv biases, BN scale + bias):
  #   stem  3*3*1*32 + 2*32          =     352
  #   block 5*5*32*32 + 2*32 = 25,664, x4 = 102,656
  #   head  32*10 + 10                =     330   -> 103,338
  assert params('factorization_net', conv='5x5') == 103_338
  # two 3x3: blocks 2 * (9*32*32 + 64) = 18,560, x4 = 74,240 -> 74,922.
  assert params('factorization_net', conv='3x3x2') == 74_922
  # separable: block 9*32 (depthwise) + 32*32 (pointwise) + 64 (BN) = 1,376, x4 -> 6,186.
  assert params('separable_net', conv='separable') == 6_186
  assert params('separable_net', conv='standard') == 352 + 4 * (9 * 32 * 32 + 64) + 330
  # The intermediate activation has no parameters.
  assert params('separable_net', conv='separable', mid_act='elu') == 6_186


@pytest.mark.parametrize('knobs,bad', [
    (dict(name='small_inception', module='bottleneck'), 'bottleneck'),
    (dict(name='factorization_net', conv='3x3'), '3x3'),
    (dict(name='separable_net', conv='standard', mid_act='relu'), 'relu'),
    (dict(name='separable_net', features=0), '0'),
])
def test_builders_reject_bad_values(knobs, bad):
  with pytest.raises(ValueError, match=bad):
    arch.build(knobs)


@pytest.mark.parametrize('experiment', EXPERIMENTS, ids=lambda m: m.__name__.split('.')[-1])
def test_experiment_files_load(experiment):
  config = experiment.get_config()
  assert config.data.name == 'digits' and tuple(config.model.input_shape) == DIGITS
  members = experiment.get_sweep()
  assert len({tuple(sorted(m.items())) for m in members}) == len(members)
  assert {m['seed'] for m in members} == {0, 1, 2}
  assert len(experiment.get_sweep('seeds=1')) == len(members) // 3
  for member in members:  # every member is a config the builder takes
    arch.build(arch.sweep.apply_overrides(config, member).model)
  assert experiment.get_config('cifar10').model.input_shape == (32, 32, 3)
  assert experiment.CLAIM and experiment.verdict(pd.DataFrame()).startswith('inconclusive: ')
  with pytest.raises(ValueError, match="unknown config key 'bogus'"):
    experiment.get_config('bogus=1')


def test_bare_model_keys():
  assert factorization.get_config('conv=1x7+7x1,num_steps=2').model.conv == '1x7+7x1'
  assert bottleneck.get_config('module=naive').model.module == 'naive'
  assert separable.get_config('model.mid_act=elu').model.mid_act == 'elu'


def test_launch_summary_and_unknown_key():
  proc = launch('summary', '--config=experiments/bottleneck.py:module=naive')
  assert proc.returncode == 0, proc.stderr
  assert 'inception4b' in proc.stdout and '4,060,784' in proc.stdout
  assert_one_line_error(launch('summary', '--config=experiments/separable.py:bogus=1'), 'bogus')


def fake_runs(column, values, errors, macs, seeds=3):
  """A sweep's `runs` frame: `errors[v]` (%) for seed 0, +0.1 point per seed."""
  return pd.DataFrame([dict(run=f'{v},seed={s}', seed=s, status='done', params=1000, macs=macs[v],
                            test_error=(errors[v] + 0.1 * s) / 100, **{column: v})
                       for v, s in itertools.product(values, range(seeds))])


def test_verdicts():
  macs = {'naive': 4e6, 'reduced': 0.8e6}
  runs = fake_runs('model.module', ['naive', 'reduced'], {'naive': 2.0, 'reduced': 2.5}, macs)
  assert bottleneck.verdict(runs).startswith('agrees: reduced 0.80M mult-adds vs naive 4.00M (80% fewer)')
  runs = fake_runs('model.module', ['naive', 'reduced'], {'naive': 2.0, 'reduced': 5.0}, macs)
  assert bottleneck.verdict(runs).startswith('disagrees: ')
  runs.loc[0, 'status'] = 'running'
  assert bottleneck.verdict(runs).startswith('inconclusive: 1 of 6 runs not done')

  convs = ['7x7', '5x5', '3x3x2', '1x7+7x1']
  macs = dict(zip(convs, (12e6, 6e6, 4e6, 3e6)))
  runs = fake_runs('model.conv', convs, dict(zip(convs, (2, 2, 2.1, 1.9))), macs)
  assert factorization.verdict(runs).startswith('agrees: 3x3x2 33% fewer mult-adds than 5x5')
  runs = fake_runs('model.conv', convs, dict(zip(convs, (2, 2, 3, 1.9))), macs)
  assert factorization.verdict(runs).startswith('disagrees: ')
  assert factorization.verdict(runs[runs['model.conv'] != '7x7']).startswith(
      'inconclusive: no runs of model.conv=7x7')

  nets = ['standard', 'none', 'relu', 'elu']
  macs = dict(zip(nets, (2e6, 0.3e6, 0.3e6, 0.3e6)))
  runs = fake_runs('model.mid_act', nets, dict(zip(nets, (2, 2, 3, 2.5))), macs)
  runs['model.conv'] = runs['model.mid_act'].map(lambda a: 'standard' if a == 'standard' else 'separable')
  runs['model.mid_act'] = runs['model.mid_act'].replace('standard', 'none')
  assert separable.verdict(runs).startswith('agrees: test error none 2.10%, relu 3.10%, elu 2.60%')
  runs.loc[runs['model.mid_act'] == 'elu', 'test_error'] -= 0.0045
  assert separable.verdict(runs).startswith('inconclusive: none vs elu within the seed spread')
  runs.loc[runs['model.mid_act'] == 'relu', 'test_error'] -= 0.02
  assert separable.verdict(runs).startswith('disagrees: ')
