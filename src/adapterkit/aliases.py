"""LLM-Adapters' own command lines (its finetune.py and evaluate.py flags) rewritten to adapterkit's.

Its scripts run through python-fire, so flags are spelled with underscores, booleans may carry a
value (`--train_on_inputs False`), lists may come bracketed without quotes (`[q_proj,v_proj]`), and
`--adapter_name bottleneck` with `--use_parallel_adapter` / `--use_adapterp` picks the method.
The tables below are the whole mapping (README "LLM-Adapters' flags" lists them).
"""

from __future__ import annotations

from .errors import warn

# flag -> adapterkit flag (same value)
TRAIN = {
    "--base_model": "--model", "--data_path": "--data", "--output_dir": "--output", "--batch_size": "--batch-size",
    "--micro_batch_size": "--micro-batch-size", "--num_epochs": "--num-epochs", "--learning_rate": "--learning-rate",
    "--cutoff_len": "--cutoff-len", "--val_set_size": "--val-set-size", "--eval_step": "--eval-steps",
    "--save_step": "--save-steps", "--lora_r": "--lora-r", "--lora_alpha": "--lora-alpha",
    "--lora_dropout": "--lora-dropout", "--lora_target_modules": "--target-modules",
    "--target_modules": "--target-modules", "--bottleneck_size": "--bottleneck-size",
    "--non_linearity": "--non-linearity", "--adapter_dropout": "--adapter-dropout", "--scaling": "--scaling",
    "--num_virtual_tokens": "--num-virtual-tokens", "--resume_from_checkpoint": "--resume",
    "--prompt_template_name": "--template",
}
TRAIN_BOOLEANS = {"--train_on_inputs": "--train-on-inputs", "--group_by_length": "--group-by-length",
                  "--use_gradient_checkpointing": "--gradient-checkpointing"}
EVAL = {"--dataset": "--task", "--base_model": "--model", "--lora_weights": "--adapter", "--batch_size": "--batch-size"}
# Flags adapterkit takes but has no use for; each is reported once.
IGNORED = {"--wandb_project", "--wandb_run_name", "--wandb_watch", "--wandb_log_model", "--load_8bit"}
METHODS = {"lora": "lora", "prefix-tuning": "prefix-tuning", "prefix_tuning": "prefix-tuning", "p-tuning": "p-tuning",
           "prompt-tuning": "prompt-tuning"}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; a value is the next token unless it is a flag."""
    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" in token:
            flag, value = token.split("=", 1)
            pairs.append((flag, value))
        elif token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((token, argv[i + 1]))
            i += 1
        else:
            pairs.append((token, None))
        i += 1
    return pairs


def _list_value(value: str) -> str:
    """`[q_proj,'v_proj']` -> `q_proj,v_proj`."""
    if value.startswith("[") and value.endswith("]"):
        return ",".join(item.strip().strip("'\"") for item in value[1:-1].split(",") if item.strip())
    return value


def uses_llm_adapters_flags(argv: list[str]) -> bool:
    known = set(TRAIN) | set(TRAIN_BOOLEANS) | set(EVAL) | IGNORED | {"--adapter_name", "--use_parallel_adapter",
                                                                     "--use_adapterp"}
    return any(token.split("=", 1)[0] in known for token in argv)


def translate(command: str, argv: list[str]) -> list[str]:
    """The same command line in adapterkit's flags (argv without the command)."""
    if not uses_llm_adapters_flags(argv):
        return argv
    pairs = _split(argv)
    flags = {flag for flag, _ in pairs}
    out: list[str] = []
    if command == "eval":
        labels = {"--model", "--adapter"} if "--base_model" in flags else set()  # its names of the model and method
        for flag, value in pairs:
            if flag in labels or flag in IGNORED:
                continue
            out += [EVAL.get(flag, flag)] + ([value] if value is not None else [])
        return out
    name, series = None, None
    for flag, value in pairs:
        if flag in IGNORED:
            warn(f"{flag} (LLM-Adapters) is ignored by adapterkit")
        elif flag == "--adapter_name":
            name = (value or "lora").lower()
        elif flag in ("--use_parallel_adapter", "--use_adapterp"):
            if value is None or value.lower() not in _FALSE:
                series = "parallel" if flag == "--use_parallel_adapter" else "adapter-p"
        elif flag in TRAIN_BOOLEANS:
            off = value is not None and value.lower() in _FALSE
            out.append(("--no-" + TRAIN_BOOLEANS[flag][2:]) if off else TRAIN_BOOLEANS[flag])
        elif flag in TRAIN:
            out += [TRAIN[flag]] + ([_list_value(value)] if value is not None else [])
        else:
            out += [flag] + ([value] if value is not None else [])
    if name == "bottleneck" or (name is None and series):
        out += ["--method", series or "adapter-h"]
        if "--target-modules" not in out:
            out += ["--preset", "llm-adapters"]  # its published placement, bottleneck 256, tanh
    elif name is not None:
        out += ["--method", METHODS.get(name, name)]
    return out
