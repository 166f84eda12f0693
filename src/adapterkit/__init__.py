"""adapterkit: parameter-efficient fine-tuning of causal language models."""

from ._version import __version__  # noqa: F401
from .architectures import ARCHITECTURES, Architecture, register_architecture  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .core import AdaptedModel, adapt  # noqa: E402
from .errors import AdapterkitError, AdapterkitWarning  # noqa: E402
from .methods import METHODS, Method, get_method, register_method  # noqa: E402
from .methods.bottleneck import AdapterHConfig, AdapterPConfig, ParallelConfig  # noqa: E402
from .methods.lora import LoraConfig  # noqa: E402
from .methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config  # noqa: E402
from .models import DEFAULT_MODEL, load_model  # noqa: E402


def load(model, directory, name: str = "default", trainable: bool = False, force: bool = False):
    """Attach a saved adapter (adapterkit's or PEFT's format) to `model`; see `adapterkit.io.load`.
    Imported on first call, so `import adapterkit.core` stays free of the io layer."""
    from .io import load as load_adapter

    return load_adapter(model, directory, name, trainable=trainable, force=force)


def save(adapted, directory, name: str | None = None, format: str = "native"):
    """Write an adapter (format "native" or "peft"); see `adapterkit.io.save`."""
    from .io import save as save_adapter

    return save_adapter(adapted, directory, name, format=format)


__all__ = [
    "ARCHITECTURES", "DEFAULT_MODEL", "METHODS", "AdaptedModel", "AdapterConfig", "AdapterHConfig",
    "AdapterPConfig", "AdapterkitError", "AdapterkitWarning", "Architecture", "LoraConfig", "Method", "PTuningConfig",
    "PTuningV2Config", "ParallelConfig", "PrefixTuningConfig", "PromptTuningConfig", "adapt", "get_method",
    "load", "load_model", "register_architecture", "register_method", "save",
]
