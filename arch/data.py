"""Image classification data: loaded whole into memory, then kept on the device.

Every data set here fits in device memory as uint8 (CIFAR-10 is 150 MB), so the
training step gathers its batch from an on-device array, normalises and augments
it inside the jitted step: no input pipeline, no host-to-device copy per step.

`config.data.name` selects the source:
  digits         scikit-learn's bundled 8x8 digits (1797 images, no download).
                 Fixed stratified split: 360 test images (36 per class),
                 1437 train; `train_test_split(random_state=0)`.
  fashion_mnist  the Debian package `dataset-fashion-mnist` (the four original
                 idx files under /usr/share/datasets/fashion-mnist), or the same
                 files in `data.data_dir`.
  anything else  a TFDS name (cifar10, cifar100, mnist, svhn_cropped, ...)
                 read from `data.data_dir`; never downloaded. `tfds:<name>`
                 forces TFDS for a name that also has a local loader above.

`data.holdout = k` moves k training images (a fixed random subset, the same for
every seed) to a 'val' split, e.g. CIFAR-10's 45k/5k.

`data.classes = (5, 6, 7, 8, 9)` keeps those classes in every split, relabelled
0..k-1 in the given order; `data.train_per_class = n` keeps n training images
of each class, the first n of a fixed permutation (seed 0, not the run's), so
the 5-shot images are among the 10-shot ones. Both apply before `holdout`; unset
(None, 0), every class and every image are kept.

TensorFlow is imported only on the TFDS path: it is slow to import and its
threads compete with XLA's.
"""
import dataclasses
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


@dataclasses.dataclass
class Data:
  """All splits concatenated into one array, so one on-device copy serves
  training (rows of 'train') and every evaluation (a row range per split)."""
  name: str
  images: np.ndarray  # (N, H, W, C) uint8, splits back to back
  labels: np.ndarray  # (N,) int32
  ranges: dict        # split -> (start, stop) rows; always 'train' and 'test'
  num_classes: int
  mean: np.ndarray    # (C,) per-channel mean of the training images, uint8 units
  std: np.ndarray     # (C,)

  @property
  def shape(self):
    return tuple(self.images.shape[1:])

  def size(self, split):
    start, stop = self.ranges[split]
    return stop - start


def load(config):
  """Returns `Data` for `config` (the `config.data` block)."""
  name = config.name
  if name in LOCAL:
    splits, num_classes = LOCAL[name](config)
  else:
    splits, num_classes = _load_tfds(name.removeprefix('tfds:'), config.get('data_dir'))
  if config.get('classes'):
    splits, num_classes = _select_classes(splits, num_classes, tuple(config.classes))
  if config.get('train_per_class', 0):
    splits = _per_class(splits, config.train_per_class, num_classes)
  if config.get('holdout', 0):
    splits = _holdout(splits, config.holdout)
  return _assemble(name, splits, num_classes)


def _assemble(name, splits, num_classes):
  order = ['train'] + [s for s in ('val', 'test') if s in splits]
  ranges, start = {}, 0
  for s in order:
    ranges[s] = (start, start + len(splits[s][1]))
    start = ranges[s][1]
  images = np.concatenate([splits[s][0] for s in order])
  labels = np.concatenate([splits[s][1] for s in order]).astype(np.int32)
  train = splits['train'][0].reshape(-1, images.shape[-1]).astype(np.float64)
  mean, std = train.mean(0), train.std(0)
  return Data(name, images, labels, ranges, num_classes,
              mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))


def _select_classes(splits, num_classes, classes):
  """Keeps `classes` in every split; label classes[i] becomes i."""
  if len(set(classes)) != len(classes) or not all(
      isinstance(c, int) and 0 <= c < num_classes for c in classes):
    raise ValueError(f'data.classes={classes} must be distinct labels in 0..{num_classes - 1}')
  relabel = np.full(num_classes, -1)
  relabel[list(classes)] = np.arange(len(classes))
  out = {}
  for split, (x, y) in splits.items():
    keep = relabel[y] >= 0
    out[split] = (x[keep], relabel[y[keep]])
  return out, len(classes)


def _per_class(splits, n, num_classes):
  """Keeps the first `n` training images of each class in a fixed permutation."""
  x, y = splits['train']
  order = np.random.RandomState(0).permutation(len(y))
  counts = np.bincount(y, minlength=num_classes)
  if not 0 < n <= counts.min():
    raise ValueError(f'data.train_per_class={n} must be between 1 and {counts.min()}, the '
                     f'training images of class {counts.argmin()}')
  keep = np.sort(np.concatenate([order[y[order] == c][:n] for c in range(num_classes)]))
  return dict(splits, train=(x[keep], y[keep]))


def _holdout(splits, k):
  """Moves a fixed random `k` training images to 'val' (seed 0, not the run's)."""
  x, y = splits['train']
  if not 0 < k < len(y):
    raise ValueError(f'data.holdout={k} must be between 0 and the {len(y)} training images')
  perm = np.random.RandomState(0).permutation(len(y))
  keep, val = np.sort(perm[:-k]), np.sort(perm[-k:])
  return dict(splits, train=(x[keep], y[keep]), val=(x[val], y[val]))


def _load_digits(config):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  # Pixels are 0..16; scale to 0..255 so every data set is uint8 in the same units.
  x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, d.target, test_size=360, stratify=d.target, random_state=0)
  return dict(train=(x_tr, y_tr), test=(x_te, y_te)), 10


def read_idx(path):
  """Reads an idx file (the MNIST format), gzipped or not, into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
  if zero != b'\0\0' or dtype_code != 0x08:
    raise ValueError(f'{path} is not a uint8 idx file')
  dims = np.frombuffer(raw, '>i4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(config):
  folder = config.get('data_dir') or FASHION_MNIST_DIR
  paths = {s: [os.path.join(folder, f) for f in files] for s, files in FASHION_MNIST_FILES.items()}
  missing = [p for ps in paths.values() for p in ps if not os.path.exists(p)]
  if missing:
    raise ValueError(f'fashion_mnist: {missing[0]} not found; install the Debian package '
                     f'dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or set '
                     f'data.data_dir to a folder with the four idx .gz files')
  splits = {}
  for split, (images, labels) in paths.items():
    x, y = read_idx(images), read_idx(labels)
    # The Debian files are re-compressed, so checksums of the .gz bytes differ from
    # the originals; check what was decoded instead.
    per_class = 6000 if split == 'train' else 1000
    if x.shape != (10 * per_class, 28, 28) or list(np.bincount(y)) != [per_class] * 10:
      raise ValueError(f'fashion_mnist: {images} decodes to images {x.shape} and label '
                       f'counts {np.bincount(y).tolist()}; expected {per_class} per class')
    splits[split] = (x[..., None], y)
  return splits, 10


LOCAL = {'digits': _load_digits, 'fashion_mnist': _load_fashion_mnist}


def _load_tfds(name, data_dir):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # TF only decodes here; no notice
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], 'GPU')  # keep TF off the accelerator JAX uses

  splits = {}
  for split in ('train', 'test'):
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # TFDS warns before the errors below
    try:
      ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False,
                           as_supervised=True, with_info=True)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f'unknown data set {name!r}: not one of {", ".join(LOCAL)} '
                       f'nor a TFDS data set') from None
    except AssertionError as e:  # what TFDS raises for data that is not prepared
      where = data_dir or '~/tensorflow_datasets (data.data_dir is unset)'
      raise ValueError(f'TFDS data set {name!r} is not prepared in {where}; on a machine '
                       f'with internet run `tfds build {name} --data_dir=DIR` and copy DIR '
                       f'here, then pass --config.data.data_dir=DIR') from e
    finally:
      logging.set_verbosity(verbosity)
    # Iterate in batches: `tfds.load(batch_size=-1)` is fine on real data but
    # aborts under tfds.testing.mock_data.
    xs, ys = zip(*tfds.as_numpy(ds.batch(4096)))
    splits[split] = (np.concatenate(xs), np.concatenate(ys))
  return splits, info.features['label'].num_classes


# ---- On-device pieces, traced inside the jitted step. --------------------------

def batch_indices(key, step, num_examples, batch_size):
  """Rows of training batch `step`: a pure function of (key, step).

  Epoch e visits the examples in the order `permutation(fold_in(key, e))`; the
  last partial batch of an epoch is dropped. Resuming at any step therefore
  reproduces the batches of an uninterrupted run.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, i = step // steps_per_epoch, step % steps_per_epoch
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))


def normalize(images, mean, std):
  return (images.astype(jnp.float32) - mean) / std


def augment(key, x, crop_pad=0, flip=False):
  """Random `crop_pad`-pixel translation (zero pad, random crop) and left-right flip.

  Zero padding happens after normalisation, i.e. the padding is the mean colour.
  """
  n, h, w, c = x.shape
  k_crop, k_flip = jax.random.split(key)
  if crop_pad:
    p = crop_pad
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * p + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(x, offsets)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(mirror, x[:, :, ::-1], x)
  return x
