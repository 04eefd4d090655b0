r"""Command line: `python launch.py <command> --config <file>[:arg] [flags]`.

  train    python launch.py train --config experiments/degradation.py:depth=56 \
               --workdir runs/plain56 [--config.batch_size=64 ...] [--restart]
           Trains, or resumes the run in --workdir, or says it is finished.
  summary  python launch.py summary --config experiments/zoo.py:xception
           Prints the network's per-block table: shapes, params, mult-adds.

Multi-host: start one process per host with --coordinator_address=host:port,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); on CPU the processes talk through gloo.

Mistakes in the input (config, data set, workdir) print one line, `error: ...`,
and exit with status 2; a run whose loss diverges exits with status 1.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

COMMANDS = ('train', 'summary')

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
FLAGS = flags.FLAGS


def fail(message, code=2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parsing, with every mistake reported as one line."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key that is not there
    key = str(e).strip('"\'')
    given = [a.split('=')[0] for a in argv if a.startswith('--config.')
             and key in a.split('=')[0].split('.')]
    fail(f'unknown config key {key!r}' + (f' in {given[0]}' if given else ''))
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # An exception inside get_config arrives with its traceback; keep its last line.
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')


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
    fail('train needs --workdir')
  init_distributed()
  from arch import train  # imports jax: after the flags, so mistakes there fail fast
  try:
    job = train.prepare(config, FLAGS.workdir, restart=FLAGS.restart)
  except ValueError as e:
    fail(e)
  try:
    train.run(job)
  except train.Diverged as e:
    fail(e, code=1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
