import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; a test that tries fails
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each
    import torch

    torch.set_num_threads(1)

from tiny_models import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


_OWN = os.sep + os.path.join("src", "adapterkit") + os.sep
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _from_our_call() -> bool:
    """True when adapterkit's own code is on the stack below the warning (it made the call)."""
    frame = sys._getframe(2)
    while frame is not None:
        if _OWN in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def deprecations_from_our_calls_are_errors(monkeypatch):
    """A deprecation that torch or transformers warns about in a call adapterkit makes fails the test:
    a later release turns it into an error (pyproject's filterwarnings catches those raised in our
    own modules; this catches those raised inside the libraries we call)."""
    import warnings

    original = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, _DEPRECATIONS) and _from_our_call():
            raise kind(message)
        return original(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
