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


def _parse_mapping(text: str) -> dict[str, float]:
    """"q_proj=16,v_proj=8" -> {"q_proj": 16, "v_proj": 8} (integers stay integers)."""
    mapping = {}
    for item in _parse_list(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE pairs separated by commas, got {text!r}")
        number = _number_or_word(value)
        if isinstance(number, str):
            raise argparse.ArgumentTypeError(f"{value!r} is not a number in {text!r}")
        mapping[key.strip()] = int(number) if float(number).is_integer() and "." not in value else number
    return mapping


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
    if text.startswith("dict"):
        return _parse_mapping
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

    p = sub.add_parser("train", help="fine-tune an adapter (flags as LLM-Adapters' finetune.py)")
    p.add_argument("--config", help="YAML file with the same keys as these flags; flags given here win")
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", help="JSON list or JSONL of instruction/input/output records")
    p.add_argument("--output", help="folder for the adapter, checkpoints, metrics.jsonl, loss.png, run.json")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, all processes together")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--val-set-size", type=int, default=2000, help="records held out for validation (0: none)")
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--save-total-limit", type=int, default=3, help="checkpoints kept")
    p.add_argument("--template", default="alpaca", help="alpaca, bare or chat")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="fp32", help="fp32, or bf16 (bf16 base + autocast, fp32 adapter)")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --output) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_method_options(p)
    parser.train_parser = p  # --config reads its flag names

    p = sub.add_parser("generate", help="generate text, with or without an adapter")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter")
    p.add_argument("--prompt", help="the instruction; read from stdin when absent")
    p.add_argument("--template", help="alpaca, bare or chat (default: the adapter's, else alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base model")

    p = sub.add_parser("eval", help="evaluate a model (with an adapter) on an LLM-Adapters task file")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter")
    p.add_argument("--task", help="gsm8k, AddSub, MultiArith, SingleEq, AQuA, mawps, mathqa, boolq, piqa, "
                                  "social_i_qa, ARC-Easy, openbookqa, ... (resolves to DIR/dataset/TASK/test.json)")
    p.add_argument("--data", help="any test file in LLM-Adapters' JSON format (with --task-type)")
    p.add_argument("--task-type", choices=("math", "choice", "boolean"), help="how --data answers are scored")
    p.add_argument("--data-dir", help="LLM-Adapters' data folder (default: the data bundled in the repository)")
    p.add_argument("--train-data", help="training file for the contamination check (default: the adapter's run.json)")
    p.add_argument("--output", help="folder for results.json and predictions.jsonl (default runs/eval/[ADAPTER-]TASK)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy decoding; more: beam search")
    p.add_argument("--template", help="alpaca, bare or chat (default: the adapter's, else alpaca)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (the dtype the model is loaded in)")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base model")

    p = sub.add_parser("verify", help="check an adapter folder: files, weights, base model, modules, fingerprint")
    p.add_argument("adapter")
    p.add_argument("--model", help="the base model (default: the one recorded in the adapter)")

    p = sub.add_parser("merge", help="merge an adapter into the base and write a plain HF checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--force", action="store_true", help="merge into a base model other than the adapter's")

    p = sub.add_parser("export", help="write an adapter in another library's format (peft: Hugging Face PEFT)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--format", choices=("peft",), default="peft")
    p.add_argument("--output", required=True)
    p.add_argument("--model", help="the base model (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--force", action="store_true", help="load the adapter onto a base model other than its own")

    sub.add_parser("bench", help="speed and memory against PEFT (benchmarks/train_speed.py; --help for its flags)")

    p = sub.add_parser("demo", help="the README's main job on the default model")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--output", default="runs/demo")
    return parser


def apply_yaml(train_parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Fill `args` from the --config YAML wherever the command line did not give the flag."""
    import yaml

    path = args.config
    try:
        values = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except OSError as exc:
        raise AdapterkitError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise AdapterkitError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(values, dict):
        raise AdapterkitError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in train_parser._actions}
    given = {a.dest for a in train_parser._actions
             if any(arg == flag or arg.startswith(flag + "=") for flag in a.option_strings for arg in argv)}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        dest = dest if dest in actions else f"opt_{dest}"
        if dest not in actions or dest in ("config", "help"):
            raise AdapterkitError(f"--config {path}: unknown key {key!r}; use the names of the train flags")
        if dest in given:
            continue  # the command line wins
        convert = actions[dest].type
        if isinstance(value, list) and convert is not None and convert not in (int, float, str):
            value = convert(",".join(map(str, value)))
        elif isinstance(value, str) and convert is not None:
            value = convert(value)
        setattr(args, dest, value)


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
    from .train import method_config

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
    from .train import TrainSettings, train

    for required in ("data", "output"):
        if getattr(args, required) is None:
            raise AdapterkitError(f"train needs --{required} (as a flag or a key of --config)")
    fields = {k: v for k, v in vars(args).items() if not k.startswith("opt_") and k not in ("command", "config")}
    options = method_options(args)
    run = train(TrainSettings(**fields, method_options=options))
    if run:  # the main process
        print(f"loss {run['first_loss']:.4f} -> {run['final_loss']:.4f}; adapter ({run['adapter']}) saved in "
              f"{args.output}")


def cmd_generate(args) -> None:
    from transformers import TextStreamer

    from .recipes import generate, load_for_inference
    from .storage import saved_template

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise AdapterkitError("empty prompt: pass --prompt TEXT or text on stdin")
    template = args.template or saved_template(args.adapter) or "alpaca"
    model, tokenizer = load_for_inference(args.model, args.adapter, force=args.force)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints as tokens come
    generate(model, tokenizer, [prompt], template, args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, streamer=streamer)


def cmd_eval(args) -> None:
    from .evaluation import format_table, run_eval
    from .storage import saved_template

    results = run_eval(args.model, args.adapter, task=args.task, data=args.data, data_dir=args.data_dir,
                       task_type=args.task_type, train_data=args.train_data, output=args.output,
                       limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       num_beams=args.num_beams, template=args.template or saved_template(args.adapter) or "alpaca",
                       dtype=args.precision, force=args.force)
    print(format_table(results))
    print(f"written: {results['output']}/results.json, {results['output']}/predictions.jsonl")


def cmd_verify(args) -> None:
    from .verify import verify

    if not verify(args.adapter, args.model):
        raise AdapterkitError(f"{args.adapter} failed verification (see the FAIL line above)")


def cmd_merge(args) -> None:
    from .recipes import merge

    drift = merge(args.model, args.adapter, args.output, args.overwrite, force=args.force)
    print(f"merged checkpoint written to {args.output} (largest logit change merged vs unmerged: {drift:.2e})")


def cmd_export(args) -> None:
    from .peft_format import export_folder

    out = export_folder(args.adapter, args.output, model=args.model, overwrite=args.overwrite, force=args.force)
    print(f"PEFT adapter written to {out}; load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r})")


def cmd_bench(bench_args: list[str]) -> int:
    """Run the benchmark script of the source checkout (it needs PEFT, the reference)."""
    import importlib.util
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_speed.py"
    if not script.is_file():
        raise AdapterkitError(f"the benchmark is not here ({script}); run it from a clone of the repository")
    if importlib.util.find_spec("peft") is None:
        raise AdapterkitError("the benchmark compares with PEFT, which is not installed: pip install peft")
    return subprocess.call([sys.executable, str(script), *bench_args])


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.steps, args.output)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its flags are the script's own
        try:
            return cmd_bench(argv[1:])
        except AdapterkitError as exc:
            print(f"adapterkit: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            apply_yaml(parser.train_parser, args, argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    except AdapterkitError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        code = globals()[f"cmd_{args.command}"](args)
    except AdapterkitError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130
    return code or 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
