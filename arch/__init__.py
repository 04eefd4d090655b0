"""arch: convolutional building blocks and the published networks made from them."""
from arch import kernels
kernels.keep_freed_memory()  # before jax starts its threads; see there

from arch.registry import build, names, register
from arch.cost import count_macs, count_params, format_summary

# Importing the network modules registers their builders.
from arch import resnet  # noqa: E402,F401
from arch import vgg, inception, separable  # noqa: E402,F401
from arch import small  # noqa: E402,F401  (digits-sized ablation nets)
