"""The methods, one module each; importing this package registers the built-in ones."""

from . import adalora, bottleneck, ia3, loha, lokr, lora, oft, prompt, vera  # noqa: E402, F401, I001  (after the registry they register into)
from .registry import METHODS, Method, get_method, register_method  # noqa: F401
