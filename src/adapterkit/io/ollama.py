"""Ollama Modelfiles: FROM the base (or merged) GGUF, ADAPTER the LoRA GGUF, TEMPLATE and stop
PARAMETERs from the prompt template the adapter was trained with (docs/modelfile.md in ollama/ollama).

Templates translated (`TRANSLATED`): adapterkit's `alpaca` and `bare` prompts (exact text, the
instruction as `{{ .Prompt }}`), and `chat` when the saved chat template is ChatML (`<|im_start|>role`
... `<|im_end|>`), checked by rendering the Jinja template on probe conversations and comparing with
what the Go template below produces; a default system prompt the Jinja template adds becomes SYSTEM.
Any other chat template is refused with one line.
"""

from __future__ import annotations

from ..data import alpaca_prompt, bare_prompt
from ..errors import AdapterkitError

TRANSLATED = ("alpaca", "bare", "chat (ChatML)")
MODELFILE = "Modelfile"
_START, _END = "<|im_start|>", "<|im_end|>"
CHATML = ("{{- range .Messages }}" + _START + "{{ .Role }}\n{{ .Content }}" + _END + "\n{{ end }}"
          + _START + "assistant\n")
_PROBE = "\x01probe-{}\x01"


def _chatml(messages: list[dict]) -> str:
    """What CHATML renders for these messages (Ollama prepends SYSTEM as a system message when the
    conversation has none)."""
    return "".join(f"{_START}{m['role']}\n{m['content']}{_END}\n" for m in messages) + f"{_START}assistant\n"


def _render(chat_template: str, messages: list[dict], special: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True,
                                        **special)
    return rendered[0]


def chatml_system(chat_template: str, special: dict | None = None) -> str | None:
    """The default system prompt of a ChatML chat template ("" for none), or None when the template is
    not ChatML as CHATML renders it."""
    special = special or {}
    user = [{"role": "user", "content": _PROBE.format(1)}]
    try:
        plain = _render(chat_template, user, special)
    except Exception:  # noqa: BLE001  (a template that fails on a plain conversation is not ChatML)
        return None
    head = plain[:-len(_chatml(user))] if plain.endswith(_chatml(user)) else None
    if head is None:
        return None
    system = ""
    if head:
        opening = f"{_START}system\n"
        if not (head.startswith(opening) and head.endswith(f"{_END}\n")):
            return None
        system = head[len(opening):-len(_END) - 1]
    probes = [
        [{"role": "system", "content": _PROBE.format(2)}, *user],
        [*user, {"role": "assistant", "content": _PROBE.format(3)}, {"role": "user", "content": _PROBE.format(4)}],
    ]
    for messages in probes:
        expected = messages if messages[0]["role"] == "system" or not system else \
            [{"role": "system", "content": system}, *messages]
        try:
            if _render(chat_template, messages, special) != _chatml(expected):
                return None
        except Exception:  # noqa: BLE001
            return None
    return system


def template_for(generation: dict, special: dict | None = None) -> tuple[str, str | None, list[str]]:
    """(TEMPLATE, SYSTEM or None, extra stop strings) for the adapter's saved template; one error
    naming the translatable templates otherwise."""
    name = generation.get("template") or "alpaca"  # adapterkit's own default, as generate and eval use
    if name == "alpaca":
        return alpaca_prompt("{{ .Prompt }}") + "{{ .Response }}", None, []
    if name == "bare":
        return bare_prompt("{{ .Prompt }}") + "{{ .Response }}", None, []
    chat_template = generation.get("chat_template")
    if name == "chat" and isinstance(chat_template, str):
        system = chatml_system(chat_template, special)
        if system is not None:
            return CHATML, system or None, [_START, _END]
        raise AdapterkitError(f"the adapter's chat template is not ChatML (adapterkit translates {', '.join(TRANSLATED)} "
                              "to Ollama); write the Modelfile's TEMPLATE yourself")
    raise AdapterkitError(f"the adapter's template {name!r} (chat template {'saved' if chat_template else 'missing'}) "
                          f"cannot be translated (adapterkit translates {', '.join(TRANSLATED)} to Ollama); write the "
                          "Modelfile's TEMPLATE yourself")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise AdapterkitError(f'the {what} holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(base: str, adapter: str | None, template: str, system: str | None, stops: list[str]) -> str:
    """The Modelfile text; paths are relative to the Modelfile's folder."""
    lines = [f"FROM ./{base}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f"TEMPLATE {_quoted(template, 'template')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    for stop in dict.fromkeys(s for s in stops if s):
        if '"' in stop or "\n" in stop:
            raise AdapterkitError(f"the stop string {stop!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
