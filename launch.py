r"""Command line: `python launch.py <command> --config <file>[:arg] [flags]`.

  train    python launch.py train --config experiments/degradation.py:depth=56 \
               --workdir runs/plain56 [--config.batch_size=64 ...] [--restart]
           Trains, or resumes the run in --workdir, or says it is finished.
  summary  python launch.py summary --config experiments/zoo.py:xception
           Prints the network's per-block table: shapes, params, mult-adds.
  sweep    python launch.py sweep --config experiments/degradation.py[:arg] \
               --workdir runs/degradation [--workers N] [--launcher local|slurm] [--dry_run]
           Runs every member of get_sweep(arg) as its own `train` process in
           <workdir>/<member>/, skipping members already done.
  report   python launch.py report --workdir runs/degradation
           Writes summary.csv and report.png for a sweep (or run) directory.

Multi-host: start one process per host with --coordinator_address=host:port,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); on CPU the processes talk through gloo.

Mistakes in the input (config, data set, workdir) print one line, `error: ...`,
and exit with status 2, before anything is written. `train` exits with
  0   done, or stopped by --config.stop_after (rerun to go on);
  1   failed: the loss diverged, or the run directory cannot be read or written
      (a full disk, no valid checkpoint); the last valid checkpoint is kept;
  2   a mistake in the input;
  3   another live process trains in --workdir (its run.lock); nothing touched;
  75  stopped by SIGTERM (a preemption notice) or SIGINT after saving a
      checkpoint: rerun to resume.
A run killed in any other way resumes from its last checkpoint when rerun, to
exactly the result it would have had.

A sweep runs only its members not yet done; one that another live process
trains (a second launcher on the same directory) is waited for, not run twice.
Locally, members stop with their launcher: a killed sweep leaves them checkpointed.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

COMMANDS = ('train', 'summary', 'sweep', 'report')

config_flags.DEFINE_config_file('config', None, 'Config file, `path.py` or `path.py:arg`.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (train).')
flags.DEFINE_bool('restart', False, 'Discard the run in --workdir and start over.')
flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                    'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', int(os.environ.get('JAX_NUM_PROCESSES', 1)),
                     'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', int(os.environ.get('JAX_PROCESS_ID', 0)),
                     'Multi-host: this process.')
flags.DEFINE_integer('workers', None, 'Sweep: parallel members (local launcher); default: '
                     'one per core, at most the number of members.')
flags.DEFINE_enum('launcher', 'local', ['local', 'slurm'], 'Sweep: where members run.')
flags.DEFINE_bool('dry_run', False, 'Sweep: print the members and exit.')
flags.DEFINE_string('slurm_partition', None, 'Sweep on SLURM: partition.')
flags.DEFINE_integer('slurm_gpus', 1, 'Sweep on SLURM: GPUs per member.')
flags.DEFINE_integer('slurm_cpus', 8, 'Sweep on SLURM: CPUs per member.')
flags.DEFINE_integer('slurm_minutes', 240, 'Sweep on SLURM: time limit per member.')
flags.DEFINE_integer('slurm_parallel', 64, 'Sweep on SLURM: members running at once.')
flags.DEFINE_string('slurm_cluster', None, "Sweep: submitit's cluster; None picks SLURM when "
                    "present, 'local' runs the same path as local processes (tests).")
FLAGS = flags.FLAGS


def fail(message, code=2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parsing, with every mistake reported as one line. It loads the --config
  file and calls its get_config, so mistakes in the file surface here too."""
  try:
    return FLAGS(argv)
  except SyntaxError as e:
    fail(f'--config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}')
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key that is not there
    if "attribute 'get_config'" in str(e):
      fail(f'--config file {config_file(argv)} defines no get_config(arg)')
    key = str(e).strip('"\'')
    given = [a.split('=')[0] for a in argv if a.startswith('--config.')
             and key in a.split('=')[0].split('.')]
    fail(f'unknown config key {key!r}' + (f' in {given[0]}' if given else ''))
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # An exception inside get_config arrives with its traceback; keep its last line.
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
  except Exception as e:  # raised by the file's get_config
    fail(f'--config {config_file(argv)}: get_config raised {type(e).__name__}: {e}')


def config_file(argv):
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1].split(':')[0]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':')[0]
  return None


def load_config():
  try:
    config = FLAGS.config
    if config is not None:
      config.keys()  # a file that failed to load raises on first use
    return config
  except OSError as e:  # config_flags defers a missing or broken file to here
    fail(f'cannot load --config: {str(e).strip().splitlines()[-1].strip()}')


def init_distributed():
  if FLAGS.num_processes <= 1:
    return
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  print(f'process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, '
        f'{jax.local_device_count()} local', flush=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    fail(f'usage: launch.py {{{"|".join(COMMANDS)}}} --config FILE[:ARG] ...; got {argv[1:]}')
  command = argv[1]
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if command == 'report':
    if not FLAGS.workdir:
      fail('report needs --workdir')
    from arch import analysis
    try:
      analysis.write_report(FLAGS.workdir)
    except ValueError as e:
      fail(e)
    print(f'wrote {os.path.join(FLAGS.workdir, "summary.csv")} and report.png')
    return
  config = load_config()
  if config is None:
    fail('--config is required')
  if command == 'summary':
    import arch
    try:
      print(arch.format_summary(arch.build(config.model), config.model.input_shape,
                                title=config.model.name))
    except ValueError as e:
      fail(e)
    return
  if not FLAGS.workdir:
    fail(f'{command} needs --workdir')
  if command == 'sweep':
    sys.exit(run_sweep())
  init_distributed()
  from arch import runfiles
  from arch import train  # imports jax: after the flags, so mistakes there fail fast
  try:
    job = train.prepare(config, FLAGS.workdir, restart=FLAGS.restart)
  except runfiles.Locked as e:
    fail(e, runfiles.EXIT_LOCKED)
  except ValueError as e:
    fail(e, runfiles.EXIT_BAD_INPUT)
  try:
    train.run(job)
  except runfiles.Locked as e:  # taken between prepare's look and run
    fail(e, runfiles.EXIT_LOCKED)
  except train.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(runfiles.EXIT_INTERRUPTED)
  except train.RunError as e:
    fail(e, runfiles.EXIT_FAILED)
  except OSError as e:  # writing metrics or summary: a full or read-only disk
    fail(f'cannot write {e.filename or FLAGS.workdir}: {e.strerror or e}; the last checkpoint '
         f'is intact, rerun to resume from it', runfiles.EXIT_FAILED)


def run_sweep():
  """Returns the exit status: 0 when every member is done, 1 when any failed."""
  from arch import sweep
  spec = FLAGS['config'].config_filename
  extra = config_flags.get_override_values(FLAGS['config'])
  try:
    members = sweep.expand(spec, extra)
  except ValueError as e:
    fail(e)
  print(f'{len(members)} members of {spec} in {FLAGS.workdir}:')
  for m in members:
    print(f'  {m["name"]}')
  if FLAGS.dry_run:
    return 0
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.launcher == 'local':
    workers = FLAGS.workers or min(len(os.sched_getaffinity(0)), len(members))
    results = sweep.run_local(spec, FLAGS.workdir, members, workers)
  else:
    params = dict(slurm_partition=FLAGS.slurm_partition, gpus_per_node=FLAGS.slurm_gpus,
                  cpus_per_task=FLAGS.slurm_cpus, timeout_min=FLAGS.slurm_minutes,
                  slurm_array_parallelism=FLAGS.slurm_parallel)
    results = sweep.run_submitit(spec, FLAGS.workdir, members, params, FLAGS.slurm_cluster)
  rest = {n: (status, r) for n, (status, r) in results.items() if status != 'done'}
  print(f'sweep: {len(results) - len(rest)} of {len(results)} members done'
        + ''.join(f'; {n} {status}: {r}' for n, (status, r) in rest.items())
        + ('; rerun to resume the interrupted' if any(s == 'interrupted' for s, _ in rest.values())
           else ''))
  return 1 if rest else 0


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
