"""The published ImageNet networks, as keras.applications builds them.

`get_config(arg)` with arg one of

  vgg16, vgg19          224x224x3   arch/vgg.py
  googlenet             224x224x3   arch/inception.py (Inception v1, no aux heads)
  inception_v3          299x299x3   arch/inception.py
  xception              299x299x3   arch/separable.py
  mobilenet             224x224x3   arch/separable.py (v1, alpha 1)
  mobilenet_v2          224x224x3   arch/separable.py (alpha 1)
  resnet50, resnet50_v2 224x224x3   arch/resnet.py

e.g. `launch.py summary --config experiments/zoo.py:xception`. `config.model`
holds `name`, `input_shape`, `num_classes=1000` and the builder's knobs at their
published values; override them on the command line
(`--config.model.alpha=0.5`).
"""
import ml_collections

# name -> (input side, knobs at their published / Keras values).
_NETS = {
    'vgg16': (224, dict(dropout=0.0, norm='none', min_input_size=32)),
    'vgg19': (224, dict(dropout=0.0, norm='none', min_input_size=32)),
    'googlenet': (224, dict(dropout=0.0, norm='none', factorize_5x5=False, min_input_size=0)),
    'inception_v3': (299, dict(dropout=0.0, factorize_5x5=False, factorize_7x7=True,
                               min_input_size=75)),
    'xception': (299, dict(dropout=0.0, mid_act='none', num_middle=8, min_input_size=71)),
    'mobilenet': (224, dict(alpha=1.0, depth_multiplier=1, dropout=0.0, min_input_size=0)),
    'mobilenet_v2': (224, dict(alpha=1.0, dropout=0.0, linear_bottleneck=True, residual=True,
                               min_input_size=0)),
    'resnet50': (224, dict()),
    'resnet50_v2': (224, dict()),
}
NAMES = tuple(_NETS)


def get_config(arg=None):
  if arg not in _NETS:
    raise ValueError(f'experiments/zoo.py: unknown network {arg!r}; '
                     f'choose one of {", ".join(NAMES)}')
  side, knobs = _NETS[arg]
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(
      dict(name=arg, num_classes=1000, input_shape=(side, side, 3), **knobs))
  return config
