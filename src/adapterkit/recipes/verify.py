"""`adapterkit verify`: every check that load runs, one line each, on demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core import AdaptedModel
from ..errors import AdapterkitError
from ..io import fingerprint
from ..io.native import (
    base_identity,
    check_base,
    check_tensors,
    config_from_json,
    load_weights,
    missing_modules,
    read_adapter,
    recorded_base,
    trainable_only,
)
from ..io.peft import is_peft_folder
from ..models import DEFAULT_MODEL, load_model
from ..settings import check_fields, option


@dataclass
class VerifySettings:
    adapter: str = option(None, "adapter folder to check", required=True, positional=True)
    model: str | None = option(None, "the base model (default: the one recorded in the adapter)")

    def __post_init__(self) -> None:
        check_fields(self)


def verify(settings: VerifySettings, report: Callable[[str], None] = print) -> bool:
    """Run the checks in order, printing `ok` or `FAIL` for each; False if any failed."""
    directory, model_name = settings.adapter, settings.model
    state: dict = {}
    all_ok = True

    def step(name: str, run: Callable[[], str | None]) -> bool:
        nonlocal all_ok
        try:
            detail = run()
        except AdapterkitError as exc:
            report(f"FAIL  {name}: {exc}")
            all_ok = False
            return False
        report(f"ok    {name}" + (f": {detail}" if detail else ""))
        return True

    def files():
        if is_peft_folder(directory):
            raise AdapterkitError("a Hugging Face PEFT folder: `load` and --adapter read it, but it records no base "
                                  "identity or fingerprint to verify; import it and save it in adapterkit's format")
        state["meta"], state["tensors"] = read_adapter(directory)
        state["config"] = config_from_json(state["meta"])
        return f"{state['meta']['method']}, format version {state['meta']['format_version']}"

    def weights():
        recorded = state["meta"].get("parameters")
        trainable = trainable_only(state["tensors"])
        check_tensors(trainable)
        count = sum(t.numel() for t in trainable.values())
        if recorded is not None and count != recorded:
            raise AdapterkitError(f"the file holds {count} parameters, the config records {recorded}")
        return f"{count:,} parameters, all finite"

    def base():
        name = model_name or recorded_base(state["meta"]) or DEFAULT_MODEL
        model, tokenizer = load_model(name)
        state["adapted"] = AdaptedModel(model)
        state["adapted"].tokenizer = tokenizer
        check_base(state["meta"].get("base_model"), base_identity(state["adapted"]), force=False)
        return name

    def modules():
        missing = missing_modules(state["meta"], state["adapted"].causal_lm)
        if missing:
            raise AdapterkitError(f"{len(missing)} recorded module(s) missing, e.g. {missing[0]}")
        return f"{len(state['meta'].get('modules', []))} modules present"

    def attach():
        record = state["adapted"].add_adapter(state["config"], "verify", trainable=False, weights_follow=True)
        load_weights(state["adapted"], record, state["tensors"], "verify")
        return "weights fit the modules"

    def fingerprint_check():
        meta = state["meta"]
        now = fingerprint.check(state["adapted"], "verify", meta.get("fingerprint"), int(meta.get("trained_steps", 0)))
        drift = now.get("drift")
        return (f"largest logit change from the base {now['max_change']:.3g}"
                + (f", drift from the saved fingerprint {drift:.2g}" if drift is not None else ", none saved"))

    for name, run in (("files", files), ("weights", weights), ("base model", base), ("modules", modules),
                      ("attach", attach), ("fingerprint", fingerprint_check)):
        if not step(name, run):
            break
    return all_ok
