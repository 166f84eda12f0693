"""The `adapterkit` command: parses arguments, calls a recipe, prints. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
import typing

from .errors import AdapterkitError
from .models import DEFAULT_MODEL


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + traceback
        self.exit(2, f"adapterkit: error: {message} (see `{self.prog} --help`)\n")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(item) for item in _parse_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _number_or_word(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _converter(hint):
    """argparse type for a config field's type hint."""
    text = str(hint)
    if hint is bool:
        return None
    if "list[int]" in text:
        return _parse_ints
    if "list[str]" in text:
        return lambda v: v if v == "all-linear" else _parse_list(v)
    if "float | str" in text:
        return _number_or_word
    if hint is int or text.startswith("int"):
        return int
    if hint is float or text.startswith("float"):
        return float
    return str


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every method (`adapterkit methods` lists them)."""
    from .config import METHODS, get_method

    get_method("lora")  # registers the built-in methods
    group = parser.add_argument_group("method options (see `adapterkit methods`)")
    seen: set[str] = set()
    for method in METHODS.values():
        for opt in method.config_class.options():
            if opt.flag in seen:
                continue
            seen.add(opt.flag)
            if opt.type is bool:
                group.add_argument(opt.flag, dest=_dest(opt.flag), action=argparse.BooleanOptionalAction,
                                   default=None, help=opt.help)
            else:
                group.add_argument(opt.flag, dest=_dest(opt.flag), type=_converter(opt.type), default=None,
                                   help=opt.help)


def _dest(flag: str) -> str:
    return "opt_" + flag[2:].replace("-", "_")


def method_options(args: argparse.Namespace) -> dict:
    """The chosen method's options from the flags given; a flag of another method is an error."""
    from .config import get_method

    given = {k: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    options = {}
    for opt in get_method(args.method).config_class.options():
        if _dest(opt.flag) in given:
            options[opt.name] = given.pop(_dest(opt.flag))
    if given:
        flag = "--" + next(iter(given))[4:].replace("_", "-")
        raise AdapterkitError(f"{flag} is not an option of {args.method}; see `adapterkit methods` for its options")
    return options


def build_parser() -> Parser:
    parser = Parser(prog="adapterkit", description="Parameter-efficient fine-tuning of causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    sub.add_parser("methods", help="list the methods with their options and defaults")

    p = sub.add_parser("info", help="describe a model (family, sizes, linear modules) or an adapter")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--method", help="also attach this method (default options) and report trainable parameters")

    p = sub.add_parser("train", help="fine-tune an adapter")
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", required=True, help="JSON list or JSONL of instruction/input/output records")
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--template", default="alpaca", help="alpaca, bare or chat")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="fp32", help="fp32, or bf16 (bf16 base + autocast, fp32 adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_method_options(p)

    p = sub.add_parser("generate", help="generate text, with or without an adapter")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter")
    p.add_argument("--prompt", help="the instruction; read from stdin when absent")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base model")

    p = sub.add_parser("merge", help="merge an adapter into the base and write a plain HF checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--force", action="store_true", help="merge into a base model other than the adapter's")

    p = sub.add_parser("demo", help="the README's main job on the default model")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output", default="runs/demo")
    return parser


def cmd_methods(args) -> None:
    from .config import METHODS, get_method

    get_method("lora")
    for method in METHODS.values():
        merge_note = "mergeable" if method.mergeable else "not mergeable"
        print(f"{method.name}  [{method.family}, {merge_note}]  {method.summary}")
        for opt in method.config_class.options():
            print(f"    {opt.flag:<22} {opt.type_name:<24} default {opt.default!r:<10} {opt.help}")


def cmd_info(args) -> None:
    from .architectures import ModelLayout, linear_module_names
    from .core import adapt
    from .models import load_model
    from .recipes import method_config

    model, _ = load_model(args.model)
    layout = ModelLayout(model)
    s = layout.shape
    print(f"model: {args.model}\nfamily: {model.config.model_type} ({type(model).__name__})")
    print(f"layers: {s.layers}  hidden: {s.hidden}  heads: {s.heads}  kv heads: {s.kv_heads}  head dim: {s.head_dim}")
    names = sorted({n.rpartition('.')[2] for n in linear_module_names(model)})
    print(f"linear modules: {', '.join(names)}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    if args.method:
        print(f"{args.method}: {adapt(model, method_config(args.method, {})).report()}")


def cmd_train(args) -> None:
    from .recipes import TrainSettings, train

    fields = {k: v for k, v in vars(args).items() if not k.startswith("opt_") and k not in ("command",)}
    options = method_options(args)
    run = train(TrainSettings(**fields, method_options=options))
    print(f"loss {run['first_loss']:.4f} -> {run['final_loss']:.4f}; adapter saved in {args.output}")


def cmd_generate(args) -> None:
    from .recipes import generate, load_for_inference

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise AdapterkitError("empty prompt: pass --prompt TEXT or text on stdin")
    model, tokenizer = load_for_inference(args.model, args.adapter, force=args.force)
    print(generate(model, tokenizer, [prompt], args.template, args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p)[0])


def cmd_merge(args) -> None:
    from .recipes import merge

    drift = merge(args.model, args.adapter, args.output, args.overwrite, force=args.force)
    print(f"merged checkpoint written to {args.output} (largest logit change merged vs unmerged: {drift:.2e})")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.steps, args.output)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        globals()[f"cmd_{args.command}"](args)
    except AdapterkitError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
