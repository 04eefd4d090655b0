"""Shared by the tests: a clean environment for subprocesses and a launch.py runner.

Every process of the session, this one and its subprocesses, shares one JAX
compilation cache in a temporary folder: the training tests run the same tiny
network many times, and on 2 CPU cores compiling it dominates their runtime.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch.py')
DEGRADATION = os.path.join(ROOT, 'experiments', 'degradation.py')
CACHE = tempfile.mkdtemp(prefix='arch-test-jax-cache-')
CACHE_ENV = dict(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
os.environ.update(CACHE_ENV)  # before this process imports jax

# ResNet-8 at half width, batch 32, 20 steps: the run every training test uses.
# lr 0.05, not 0.1: at 0.1 this run is chaotic (BN's one-pass variance, E[x^2] -
# E[x]^2, cancels on near-constant channels of the digits), so changing only the
# order of float sums, as more devices do, moves the step-20 loss by 0.6%.
TINY = ('depth=8,width=0.5,batch_size=32,eval_batch_size=256,num_steps=20,log_every=1,'
        'eval_every=20,checkpoint_every=10,schedule.lr=0.05')


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(CACHE, ignore_errors=True)


def clean_env(**extra):
  """os.environ without XLA_FLAGS (each test picks its device count), CPU only."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(CACHE_ENV, JAX_PLATFORMS='cpu')
  env.update(extra)
  return env


def launch_command(*args):
  return [sys.executable, LAUNCH, *map(str, args)]


def launch(*args, env=None, timeout=300):
  """Runs `python launch.py ARGS` to completion; returns the CompletedProcess."""
  return subprocess.run(launch_command(*args), cwd=ROOT, env=env or clean_env(),
                        capture_output=True, text=True, timeout=timeout)


def get_config(arg=''):
  """experiments/degradation.py's get_config(arg), unlocked for tests to edit."""
  spec = importlib.util.spec_from_file_location('degradation', DEGRADATION)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def execute_notebook(name, parameters):
  """Runs notebooks/<name> with its one cell tagged `parameters` replaced by the
  source `parameters`; returns the executed notebook and its PNG outputs."""
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'{name} needs one cell tagged parameters'
  cells[0].source = parameters
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  return nb, images


def assert_one_line_error(proc, *words):
  """Status 2 and stderr exactly one line, `error: ...`, containing `words`."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for word in words:
    assert word in lines[0], lines[0]
