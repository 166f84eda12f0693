"""A Hugging Face tokenizer as GGUF tokenizer metadata (tokenizer.ggml.*), the way llama.cpp's
convert_hf_to_gguf.py writes a byte-level BPE vocabulary (its `_set_vocab_gpt2`): model "gpt2", the
tokens by id, their types (added special tokens CONTROL, other added tokens USER_DEFINED, ids the
tokenizer lacks "[PADn]" UNUSED), the merges, the pre-tokenizer's llama.cpp name, the special token ids,
whether BOS/EOS are added, and the chat template.

Only byte-level BPE tokenizers are written (GPT-2's scheme, which the default model uses); a
SentencePiece, WordPiece or word-level vocabulary is refused with one line.
"""

from __future__ import annotations

import json

from ..architectures import GGUF_BPE_VOCAB
from ..errors import AdapterkitError

_MODEL, _SPLIT = GGUF_BPE_VOCAB
# llama.cpp's names for the pre-tokenizers it knows, keyed by the Hugging Face pre-tokenizer that
# splits text the same way (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2: GPT-2's regex, which
# tokenizers' ByteLevel(use_regex=True) applies).
_PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "use_regex": True}, sort_keys=True): _SPLIT,
}
_USED_KEYS = ("type", "use_regex")


def _structure(pre: dict | None) -> str | None:
    if not isinstance(pre, dict):
        return None
    return json.dumps({k: pre.get(k) for k in _USED_KEYS if k in pre}, sort_keys=True)


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AdapterkitError("the tokenizer has no tokenizers backend (tokenizer.json); GGUF export needs a fast "
                              "tokenizer")
    return json.loads(backend.to_str())


def check_tokenizer(tokenizer, vocab_size: int) -> str:
    """The llama.cpp pre-tokenizer name, or one error naming what GGUF cannot hold."""
    data = tokenizer_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise AdapterkitError(f"the tokenizer is {model.get('type')}, not byte-level BPE: adapterkit writes GGUF "
                              "vocabularies for byte-level BPE tokenizers only")
    pre = _PRE_TOKENIZERS.get(_structure(data.get("pre_tokenizer")))
    if pre is None or (data.get("decoder") or {}).get("type") != "ByteLevel" or data.get("normalizer"):
        raise AdapterkitError(f"the tokenizer's pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:120]} (with its "
                              "normalizer and decoder) is not one adapterkit can name in GGUF (byte-level BPE "
                              "split by ByteLevel's own regex)")
    if not model.get("merges"):
        raise AdapterkitError("the BPE tokenizer has no merges; GGUF's BPE vocabulary needs them")
    if len(tokenizer.get_vocab()) > vocab_size:
        raise AdapterkitError(f"the tokenizer has {len(tokenizer.get_vocab())} tokens, more than the model's "
                              f"{vocab_size} embeddings")
    return pre


def _merges(data: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]


def _adds(tokenizer, token_id: int | None, where: str) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if where == "start" else ids[-1]) == token_id


def add_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None = None) -> None:
    """Write the tokenizer's GGUF keys (the model must have `vocab_size` embeddings)."""
    import gguf

    pre = check_tokenizer(tokenizer, vocab_size)
    data = tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(_MODEL)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data))
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, "start"))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, "end"))
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
