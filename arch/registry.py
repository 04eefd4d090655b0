"""One registry: a model name maps to a builder, and `build(config.model)` calls it.

Builders take the model config's fields as keyword arguments, so a config key a
builder does not know is an error that names it, not a silently ignored knob.
"""
import inspect

_BUILDERS = {}

# Keys every model config may carry that are not builder arguments.
_META_KEYS = ('name', 'input_shape')


def register(name):
  """Decorator: `@register('cifar_resnet') def cifar_resnet(depth, ...): ...`."""
  def wrap(builder):
    if name in _BUILDERS:
      raise ValueError(f'model {name!r} is registered twice')
    _BUILDERS[name] = builder
    return builder
  return wrap


def names():
  return sorted(_BUILDERS)


def builders():
  """{name: builder}, every registered model."""
  return dict(_BUILDERS)


def build(model_config):
  """Returns the Linen module that `model_config` describes."""
  cfg = dict(model_config)
  name = cfg.get('name')
  if name not in _BUILDERS:
    raise ValueError(f'unknown model {name!r}; registered models: {", ".join(names())}')
  builder = _BUILDERS[name]
  kwargs = {k: v for k, v in cfg.items() if k not in _META_KEYS}
  accepted = inspect.signature(builder).parameters
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f'model {name!r} does not take {", ".join(unknown)}; '
                     f'it takes: {", ".join(accepted)}')
  return builder(**kwargs)
