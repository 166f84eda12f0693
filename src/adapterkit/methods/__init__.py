"""Built-in methods; importing this package registers them."""

from . import bottleneck, lora, prompt  # noqa: F401
