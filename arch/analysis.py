"""Load run and sweep directories into pandas, and the plots reports and notebooks share.

    runs, metrics = arch.analysis.load('runs/degradation')

`runs` has one row per run: the config keys that vary across runs (e.g.
`model.depth`, `model.shortcut`, `seed`) and the fields of its summary.json.
`metrics` has every line of every metrics.jsonl, with the same config columns.
"""
import json
import os

import pandas as pd

from arch import runfiles


def run_dirs(path):
  """A run directory itself, or the run directories one level below a sweep. A
  group of seeds trained as one program (config num_seeds > 1) stands for its
  replicas' run directories, named `<group>,seed=<s>`."""
  if os.path.exists(os.path.join(path, 'config.json')):
    return _with_replicas(os.path.basename(os.path.normpath(path)), path)
  if not os.path.isdir(path):
    raise ValueError(f'{path!r} is not a run or sweep directory')
  dirs = {}
  for name in sorted(os.listdir(path)):
    if os.path.exists(os.path.join(path, name, 'config.json')):
      dirs.update(_with_replicas(name, os.path.join(path, name)))
  return dirs


def _with_replicas(name, run_dir):
  config = runfiles.read_json(os.path.join(run_dir, 'config.json'))
  replicas = runfiles.replica_dirs(run_dir, config)
  if not replicas:
    return {name: run_dir}
  return {f'{name},seed={s}': d for s, d in replicas.items()
          if os.path.exists(os.path.join(d, 'config.json'))}


def load(path):
  """(runs, metrics) DataFrames for a run or sweep directory."""
  dirs = run_dirs(path)
  configs = {name: runfiles.flatten(runfiles.read_json(os.path.join(d, 'config.json')))
             for name, d in dirs.items()}
  overrides = {m['name']: m['overrides'] for m in
               runfiles.read_json(os.path.join(path, 'sweep.json')).get('members', [])}
  keys = {k for o in overrides.values() for k in o}
  all_keys = {k for c in configs.values() for k in c}
  keys |= {k for k in all_keys
           if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1}
  keys = sorted(keys)
  rows, frames = [], []
  for name, d in dirs.items():
    columns = {'run': name, **{k: configs[name].get(k) for k in keys}}
    summary = runfiles.read_json(os.path.join(d, 'summary.json'))
    rows.append({**columns, **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
    metrics_path = os.path.join(d, 'metrics.jsonl')
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
      frames.append(pd.read_json(metrics_path, lines=True).assign(**columns))
  runs = pd.DataFrame(rows)
  metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=['run', 'step'])
  return runs, metrics


def eval_curves(metrics):
  """Evaluation lines only (clean train and test error), averaged over seeds."""
  evals = metrics[metrics['split'].notna()] if 'split' in metrics else metrics.iloc[:0]
  group = [c for c in evals.columns if c.startswith('model.')] + ['split', 'step']
  return evals.groupby(group, as_index=False)['error'].mean()


def plot_degradation(metrics, axes=None, by='model.depth'):
  """The ResNet paper's Figure 6: plain nets left, residual nets right; error (%)
  against steps, one colour per depth, training error thin and test error bold.
  With several residual shortcuts (A, B, C), one marker per shortcut."""
  import matplotlib.pyplot as plt
  if axes is None:
    _, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  curves = eval_curves(metrics)
  depths = sorted(curves[by].unique())
  colours = dict(zip(depths, plt.cm.viridis([i / max(1, len(depths) - 1) for i in range(len(depths))])))
  for ax, plain, title in ((axes[0], True, 'plain'), (axes[1], False, 'ResNet')):
    panel = curves[(curves['model.shortcut'] == 'none') == plain]
    shortcuts = sorted(panel['model.shortcut'].unique())
    for depth in depths:
      for shortcut, marker in zip(shortcuts, 'xos^v'):
        name = f'{title}-{depth}' + (f' ({shortcut})' if len(shortcuts) > 1 else '')
        for split, width, style in (('train', 1, '--'), ('test', 2.5, '-')):
          c = panel[(panel[by] == depth) & (panel['model.shortcut'] == shortcut) &
                    (panel['split'] == split)]
          if len(c):
            ax.plot(c['step'], 100 * c['error'], style, lw=width, color=colours[depth],
                    marker=marker if len(shortcuts) > 1 else None, label=f'{name} {split}')
    ax.set_title(f'{title} nets')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  axes[0].set_ylabel('error (%)  (dashed: train, bold: test)')
  return axes


def final_table(runs, index='model.depth', columns='model.shortcut', value='train_error'):
  """Final error in %, mean over seeds: depth down, shortcut across."""
  return (100 * runs.pivot_table(index=index, columns=columns, values=value, aggfunc='mean')).round(2)


def variant_stats(runs, column, variants, value='test_error'):
  """Per variant of `column`, in the order given: `error` (mean of `value` over
  seeds, %), `spread` (max - min over seeds, percentage points), `seeds`, `macs`
  and `params`. What experiments' verdicts rest on; a ValueError says why there is
  nothing to rest on (a variant with no runs, a run not done)."""
  if runs.empty or column not in runs:
    raise ValueError(f'no runs with a {column} column')
  rows = runs[runs[column].isin(variants)]
  missing = [str(v) for v in variants if v not in set(rows[column])]
  if missing:
    raise ValueError(f'no runs of {column}={", ".join(missing)}')
  if value not in rows or 'status' not in rows:
    raise ValueError(f'no run has a {value} yet')
  unfinished = rows[(rows['status'] != 'done') | rows[value].isna()]
  if len(unfinished):
    raise ValueError(f'{len(unfinished)} of {len(rows)} runs not done: {", ".join(unfinished["run"])}')
  group = rows.groupby(column)
  stats = pd.DataFrame({'error': 100 * group[value].mean(),
                        'spread': 100 * (group[value].max() - group[value].min()),
                        'seeds': group[value].count(), 'macs': group['macs'].mean(),
                        'params': group['params'].mean()})
  return stats.loc[list(variants)]


def load_diagnostics(path):
  """Every run's diagnostics.jsonl (step, block, grad_norm, branch_ratio) with the
  run's config columns, as one DataFrame."""
  runs, _ = load(path)
  config_columns = [c for c in runs.columns if '.' in c or c in ('run', 'seed')]
  frames = []
  for name, d in run_dirs(path).items():
    p = os.path.join(d, 'diagnostics.jsonl')
    if os.path.exists(p) and os.path.getsize(p):
      row = runs[runs['run'] == name][config_columns].iloc[0].to_dict()
      frames.append(pd.read_json(p, lines=True).assign(**row))
  if not frames:
    return pd.DataFrame(columns=['run', 'step', 'block', 'grad_norm', 'branch_ratio'])
  frame = pd.concat(frames, ignore_index=True)
  frame['block_index'] = frame.groupby('run')['block'].transform(
      lambda b: b.map({n: i for i, n in enumerate(dict.fromkeys(b))}))
  return frame


def plot_block_diagnostics(diagnostics, value, axes=None, step='first'):
  """One line per run: `value` ('grad_norm' or 'branch_ratio') against block index,
  at the first or last diagnostics step of each run."""
  import matplotlib.pyplot as plt
  if axes is None:
    _, axes = plt.subplots(figsize=(6, 4))
  for name, d in diagnostics.groupby('run'):
    at = d['step'].min() if step == 'first' else d['step'].max()
    d = d[d['step'] == at].sort_values('block_index')
    axes.plot(d['block_index'], d[value], marker='.', label=f'{name} (step {at})')
  axes.set_xlabel('block (input side left)')
  axes.set_ylabel(value)
  axes.set_yscale('log')
  axes.legend(fontsize=7)
  return axes


def variant_columns(runs):
  """The config columns that tell a sweep's variants apart: dotted ones (`model.width`), not `seed`."""
  return [c for c in runs.columns if '.' in c]


def variant_means(runs, values=('train_error', 'test_error', 'params', 'macs')):
  """Done runs only, averaged over seeds: one row per variant, `variant_columns` kept."""
  done = runs[runs['status'] == 'done'] if 'status' in runs else runs.iloc[:0]
  keys = variant_columns(done) or ['run']
  values = [v for v in values if v in done]
  if done.empty:
    return pd.DataFrame(columns=[*keys, *values])
  return done.groupby(keys, dropna=False, sort=False)[values].mean().reset_index()


def power_law_exponent(x, y):
  """b in y ~ x^b, a least-squares line through log y against log x: how a cost
  scales with a width multiplier (2 for "quadratically")."""
  import numpy as np
  return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def pareto_front(points, x='macs', y='test_error'):
  """The points no other point beats on both cost `x` and error `y`, by increasing `x`."""
  points = points.dropna(subset=[x, y]).sort_values([x, y])
  return points[points[y] < points[y].cummin().shift(fill_value=float('inf'))]


def error_axis(ax, largest):
  """An axis of errors in %, up to `largest`: linear below 1%, so zero shows, log
  above, so 0.3% and 40% both read."""
  ax.set_yscale('symlog', linthresh=1)
  top = 1.3 * max(1.0, largest)
  ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100) if t <= top]
  ax.set_yticks(ticks, [f'{t:g}' for t in ticks])
  ax.set_ylim(-0.1, top)


def plot_pareto(experiments, x='macs', y='test_error', ax=None):
  """Error (%) against cost for several sweeps ({name: runs}): one colour and
  marker per experiment, one point per variant (mean over seeds), and the Pareto
  front of all of them as a step line: the cheapest net for each error level."""
  import matplotlib.pyplot as plt
  if ax is None:
    _, ax = plt.subplots(figsize=(7, 4.5))
  points = []
  for i, (name, runs) in enumerate(experiments.items()):
    means = variant_means(runs).assign(experiment=name)
    ax.scatter(means[x], 100 * means[y], marker='osD^vP*X'[i % 8], color=f'C{i}', label=name)
    points.append(means)
  points = pd.concat(points, ignore_index=True) if points else pd.DataFrame(columns=[x, y])
  front = pareto_front(points, x, y)
  if len(front):
    ax.step(front[x], 100 * front[y], where='post', color='k', lw=1, alpha=0.5, label='Pareto front')
  ax.set_xscale('log')
  error_axis(ax, 100 * points[y].max() if len(points) else 0)
  ax.set_xlabel({'macs': 'multiply-adds per example', 'params': 'parameters'}.get(x, x))
  ax.set_ylabel(f'{y.replace("_", " ")} (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return ax


def plot_claim(runs, claim, verdict, ax=None):
  """One claim's panel: final train and test error (%) per variant (mean over
  seeds), titled with the paper's claim and the sweep's verdict on it."""
  import textwrap
  import matplotlib.pyplot as plt
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4.5))
  means = variant_means(runs)
  keys = variant_columns(means)
  labels = [', '.join(f'{k.split(".")[-1]}={row[k]}' for k in keys) or 'all'
            for _, row in means.iterrows()]
  positions = range(len(means))
  ax.bar([p - 0.2 for p in positions], 100 * means.get('train_error', 0), 0.4, label='train')
  ax.bar([p + 0.2 for p in positions], 100 * means.get('test_error', 0), 0.4, label='test')
  ax.set_xticks(list(positions), labels, rotation=45, ha='right', fontsize=7)
  ax.set_ylabel('final error (%)')
  error_axis(ax, 100 * means[['train_error', 'test_error']].max().max() if len(means) else 0)
  ax.legend(fontsize=7)
  colour = {'agrees': 'green', 'disagrees': 'red'}.get(verdict.split(':')[0], 'grey')
  ax.set_title(textwrap.fill(claim, 100), fontsize=7, loc='left')
  ax.set_xlabel(textwrap.fill(verdict, 110), fontsize=7, color=colour, loc='left')
  return ax


def experiment_verdict(workdir, runs):
  """The verdict(runs) line of the experiment that made the sweep in `workdir`
  (its sweep.json names the file), or None when it defines none."""
  from arch import sweep
  spec = runfiles.read_json(os.path.join(workdir, 'sweep.json')).get('experiment')
  if not spec:
    return None
  path = sweep.split_spec(spec)[0]
  if not os.path.isfile(path):  # a path relative to the repository, run from elsewhere
    path = os.path.join(sweep.ROOT, path)
  if not os.path.isfile(path):
    return None
  verdict = getattr(sweep.load_experiment(path), 'verdict', None)
  return verdict(runs) if callable(verdict) else None


def write_report(workdir, print_table=True):
  """`launch.py report`: summary.csv (one row per member) and report.png (Figure 6)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  runs, metrics = load(workdir)
  if runs.empty:
    raise ValueError(f'{workdir!r} holds no runs')
  overrides = sorted({k for m in runfiles.read_json(os.path.join(workdir, 'sweep.json'))
                      .get('members', []) for k in m['overrides']})
  config_columns = overrides or [c for c in runs.columns if '.' in c]
  if 'seed' in runs and 'seed' not in config_columns:  # groups of seeds: a row per seed
    config_columns = [c for c in config_columns if c != 'num_seeds'] + ['seed']
  wanted = ['run', *config_columns, 'status', 'train_error', 'test_error', 'params', 'macs', 'step',
            'wall_s', 'reason']
  table = runs[[c for c in wanted if c in runs.columns]].sort_values(config_columns or 'run')
  table.to_csv(os.path.join(workdir, 'summary.csv'), index=False)
  if 'model.shortcut' in metrics and 'model.depth' in metrics:
    axes = plot_degradation(metrics)
    fig = axes[0].figure
  else:
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, split), c in metrics[metrics.get('split', pd.Series(dtype=str)).notna()].groupby(
        ['run', 'split']):
      ax.plot(c['step'], 100 * c['error'], lw=2.5 if split == 'test' else 1, label=f'{name} {split}')
    ax.set_xlabel('step'); ax.set_ylabel('error (%)'); ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'report.png'), dpi=120)
  plt.close(fig)
  if print_table:
    with pd.option_context('display.width', 200, 'display.max_columns', 20):
      print(table.drop(columns=[c for c in ('reason',) if c in table]).to_string(index=False))
    verdict = experiment_verdict(workdir, runs)
    if verdict:
      print(verdict)
  return table
