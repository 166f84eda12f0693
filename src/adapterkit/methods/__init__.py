"""Built-in methods; importing this package registers them."""

from . import lora  # noqa: F401
