"""Data: the splits, the idx reader, TFDS (mocked) and the on-device pieces."""
import gzip
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arch import data as data_lib


def data_config(**kw):
  return ml_collections.ConfigDict(dict(dict(name='digits', data_dir=None, holdout=0), **kw))


def test_digits_fixed_stratified_split():
  d = data_lib.load(data_config())
  assert d.images.dtype == np.uint8 and d.shape == (8, 8, 1)
  assert d.ranges == {'train': (0, 1437), 'test': (1437, 1797)}
  assert d.images.max() == 255 and d.num_classes == 10
  test_labels = d.labels[slice(*d.ranges['test'])]
  assert np.bincount(test_labels).min() >= 35 and np.bincount(test_labels).max() <= 37
  again = data_lib.load(data_config())
  np.testing.assert_array_equal(d.images, again.images)
  assert d.mean.shape == d.std.shape == (1,)


def test_holdout_moves_a_fixed_subset_to_val():
  d = data_lib.load(data_config(holdout=100))
  assert d.ranges == {'train': (0, 1337), 'val': (1337, 1437), 'test': (1437, 1797)}
  np.testing.assert_array_equal(d.labels, data_lib.load(data_config(holdout=100)).labels)
  with pytest.raises(ValueError, match='holdout'):
    data_lib.load(data_config(holdout=5000))


def write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, '>i4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
  x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  write_idx(str(tmp_path / 'x.gz'), x)
  np.testing.assert_array_equal(data_lib.read_idx(str(tmp_path / 'x.gz')), x)


def test_fashion_mnist_missing_names_the_package(tmp_path):
  with pytest.raises(ValueError, match='apt-get install dataset-fashion-mnist'):
    data_lib.load(data_config(name='fashion_mnist', data_dir=str(tmp_path)))


@pytest.mark.skipif(not os.path.exists(data_lib.FASHION_MNIST_DIR),
                    reason='apt-get install dataset-fashion-mnist')
def test_fashion_mnist_from_debian_package():
  d = data_lib.load(data_config(name='fashion_mnist'))  # checks 6000/1000 per class itself
  assert d.shape == (28, 28, 1) and d.ranges == {'train': (0, 60000), 'test': (60000, 70000)}
  assert np.bincount(d.labels[60000:]).tolist() == [1000] * 10
  assert 60 < d.mean[0] < 80  # Fashion-MNIST's published mean is 0.286 * 255 = 72.9


def test_tfds_mock_cifar10(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24):
    d = data_lib.load(data_config(name='cifar10', data_dir=str(tmp_path)))
  assert d.shape == (32, 32, 3) and d.num_classes == 10
  assert d.ranges == {'train': (0, 24), 'test': (24, 48)} and d.mean.shape == (3,)


def test_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown data set 'no_such_data'"):
    data_lib.load(data_config(name='no_such_data'))
  with pytest.raises(ValueError, match='not prepared.*tfds build mnist'):
    data_lib.load(data_config(name='tfds:mnist', data_dir=str(tmp_path)))


def test_batches_are_a_pure_function_of_seed_and_step():
  key = jax.random.key(0)
  batches = [np.asarray(data_lib.batch_indices(key, s, 100, 32)) for s in range(6)]
  epoch0 = np.concatenate(batches[:3])  # 3 batches per epoch; 4 rows dropped
  assert len(set(epoch0)) == 96
  assert not np.array_equal(batches[0], batches[3])  # a new order each epoch
  jitted = jax.jit(data_lib.batch_indices, static_argnums=(2, 3))
  np.testing.assert_array_equal(jitted(key, jnp.int32(4), 100, 32), batches[4])


def test_augment():
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  key = jax.random.key(1)
  np.testing.assert_array_equal(data_lib.augment(key, x), x)
  flipped = data_lib.augment(key, x, flip=True)
  same = [bool(jnp.all(f == o)) for f, o in zip(flipped, x)]
  mirrored = [bool(jnp.all(f == o[:, ::-1])) for f, o in zip(flipped, x)]
  assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 16
  cropped = np.asarray(data_lib.augment(key, x, crop_pad=2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  shifts = []  # each crop is an 8x8 window of the zero-padded image
  for c, p in zip(cropped, padded):
    shifts.append([(i, j) for i in range(5) for j in range(5)
                   if np.array_equal(c, p[i:i + 8, j:j + 8])][0])
  assert len(set(shifts)) > 1
