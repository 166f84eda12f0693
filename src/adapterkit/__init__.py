"""adapterkit: parameter-efficient fine-tuning of causal language models."""

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, Architecture, register_architecture  # noqa: E402
from .config import METHODS, AdapterConfig, get_method, register_method  # noqa: E402
from .core import AdaptedModel, adapt  # noqa: E402
from .errors import AdapterkitError  # noqa: E402
from .methods.bottleneck import AdapterHConfig, AdapterPConfig, ParallelConfig  # noqa: E402
from .methods.lora import LoraConfig  # noqa: E402
from .models import DEFAULT_MODEL, load_model  # noqa: E402
from .storage import load_adapter as load  # noqa: E402

__all__ = [
    "AdapterHConfig", "AdapterPConfig", "ParallelConfig", "ARCHITECTURES", "DEFAULT_MODEL", "METHODS", "AdaptedModel", "AdapterConfig", "AdapterkitError",
    "Architecture", "LoraConfig", "adapt", "get_method", "load", "load_model", "register_architecture",
    "register_method",
]
