"""The `adapterkit` command: flags generated from the recipes' settings dataclasses, then a recipe
call and its printing. No logic of its own: defaults, types, bounds and help live in the dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing

from .aliases import translate
from .errors import AdapterkitError
from .settings import Parser, convert, flag_of, from_mapping, takes_list

METHOD_OPTION = "method option "  # namespace prefix of the method flags
_NUM = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_NUMBER = re.compile(rf"^-{_NUM}(,\s*-?{_NUM})*$")  # a negative number, or a list of numbers starting with one


def _commands() -> dict[str, tuple[str, type]]:
    """command -> (help, settings class)."""
    from .recipes.check import CheckSettings
    from .recipes.combine import CombineSettings
    from .recipes.demo import DemoSettings
    from .recipes.evaluate import EvalSettings
    from .recipes.export import ExportSettings
    from .recipes.generate import GenerateSettings
    from .recipes.info import InfoSettings
    from .recipes.inspect import InspectSettings
    from .recipes.merge import MergeSettings
    from .recipes.plan import PlanSettings
    from .recipes.serve import ServeSettings
    from .recipes.study import StudySettings
    from .recipes.train import TrainSettings
    from .recipes.verify import VerifySettings

    return {
        "info": ("describe a model (family, sizes, linear modules)", InfoSettings),
        "inspect": ("the table row a model matched and every target grouped by role, with counts", InspectSettings),
        "train": ("fine-tune an adapter (flags as LLM-Adapters' finetune.py)", TrainSettings),
        "generate": ("generate text, with or without an adapter", GenerateSettings),
        "eval": ("evaluate a model (with an adapter) on an LLM-Adapters task file", EvalSettings),
        "verify": ("check an adapter folder: files, weights, base model, modules, fingerprint", VerifySettings),
        "merge": ("merge an adapter into the base and write a plain HF checkpoint", MergeSettings),
        "combine": ("several adapters of one base, weighted, into a new adapter: cat, linear, svd, ties, "
                    "dare_linear, dare_ties", CombineSettings),
        "export": ("write an adapter in another format: peft (Hugging Face PEFT), gguf, ollama", ExportSettings),
        "check": ("can a serving target (vllm, llamacpp, ollama, peft, tgi) carry the adapter as it is", CheckSettings),
        "serve": ("an OpenAI-compatible server for the base model and many adapters at once", ServeSettings),
        "plan": ("predict a training run's peak memory without running the model; the micro-batch that fits",
                 PlanSettings),
        "demo": ("the README's main job on the default model", DemoSettings),
        "study": ("LLM-Adapters' comparison: methods x tasks x seeds with a learning-rate pilot, a leaderboard "
                  "and plots", StudySettings),
    }


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field (default SUPPRESS: only what the user typed reaches the namespace)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = meta.get("help", "") + ("" if default in (None, False) else f" (default: {default})")
        if meta.get("positional"):
            nargs = "*" if takes_list(typing.get_type_hints(cls)[f.name]) else "?"
            parser.add_argument(f.name, nargs=nargs, default=argparse.SUPPRESS, help=text)
        elif (hint := typing.get_type_hints(cls)[f.name]) is bool:
            parser.add_argument(flag_of(f), *meta.get("aliases", ()), dest=f.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=text)
        else:  # a list may be given comma-separated, by repeating the flag, or both
            repeats = takes_list(hint)
            parser.add_argument(flag_of(f), *meta.get("aliases", ()), dest=f.name, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=text, action="append" if repeats else "store")


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every method (`adapterkit methods` lists them); dest METHOD_OPTION + flag."""
    from .methods import METHODS

    group = parser.add_argument_group("method options (see `adapterkit methods`)")
    first: dict[str, object] = {}
    aliases: dict[str, list[str]] = {}
    for method in METHODS.values():
        for o in method.config_class.options():
            first.setdefault(o.flag, o)
            aliases.setdefault(o.flag, [])
            aliases[o.flag] += [a for a in o.aliases if a not in aliases[o.flag]]
    for flag, o in first.items():
        kind = {"action": argparse.BooleanOptionalAction} if o.type is bool else \
            {"metavar": o.name.upper(), "action": "append" if takes_list(o.type) else "store"}
        group.add_argument(flag, *aliases[flag], dest=METHOD_OPTION + flag, default=argparse.SUPPRESS,
                           help=o.help, **kind)


def build_parser() -> Parser:
    parser = Parser(prog="adapterkit", description="Parameter-efficient fine-tuning of causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("methods", help="list the methods with their options and defaults")
    for name, (text, cls) in _commands().items():
        p = sub.add_parser(name, help=text)
        add_settings(p, cls)
        if name == "train":
            p.add_argument("--config", default=argparse.SUPPRESS, dest="config",
                           help="YAML file with the same keys as these flags; flags given here win")
            add_method_options(p)
    sub.add_parser("bench", help="speed and memory against PEFT (adapterkit.bench.train_speed; --help for its flags)")
    return parser


def _typed(cls: type, given: dict) -> dict:
    """Flag texts converted to the fields' types."""
    hints = typing.get_type_hints(cls)
    flags = {f.name: flag_of(f) for f in dataclasses.fields(cls)}
    given = {k: ",".join(v) if isinstance(v, list) else v for k, v in given.items()}  # repeated flags
    return {k: v if isinstance(v, bool) else convert(v, hints[k], flags[k]) for k, v in given.items()}


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as exc:
        raise AdapterkitError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise AdapterkitError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise AdapterkitError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AdapterkitError(f"--config {path}: expected a mapping of flag names to values")
    return values


def train_settings(given: dict, method_flags: dict, yaml_path: str | None):
    """TrainSettings from defaults < YAML < flags; method options by flag name or option name."""
    from .methods import get_method
    from .recipes.train import TrainSettings

    values = read_yaml(yaml_path) if yaml_path else {}
    own = {f.name for f in dataclasses.fields(TrainSettings)} - {"method_options"}
    method = given.get("method") or values.get("method") or "lora"
    options = get_method(str(method)).config_class.options()
    by_key = {o.flag[2:].replace("-", "_"): o for o in options} | {o.name: o for o in options}
    yaml_own, yaml_options = {}, {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in own:
            yaml_own[key] = value
        elif key in by_key:
            o = by_key[key]
            yaml_options[o.name] = convert(value, o.type, f"--config {yaml_path}: {key}") \
                if isinstance(value, str) else value
        else:
            raise AdapterkitError(f"--config {yaml_path}: unknown key {key!r} (for method {method}); use the "
                                  "names of the train flags")
    fields = from_mapping(TrainSettings, yaml_own, f"--config {yaml_path}") | _typed(TrainSettings, given)
    by_flag = {o.flag: o for o in options} | {alias: o for o in options for alias in o.aliases}
    for flag, text in method_flags.items():
        if flag not in by_flag:
            raise AdapterkitError(f"{flag} is not an option of {method}; see `adapterkit methods` for its options")
        o = by_flag[flag]
        text = ",".join(text) if isinstance(text, list) else text  # a repeated flag
        yaml_options[o.name] = text if isinstance(text, bool) else convert(text, o.type, flag)
    for required in ("data", "output"):
        if fields.get(required) is None:
            raise AdapterkitError(f"train needs --{required} (as a flag or a key of --config)")
    return TrainSettings(**fields, method_options=yaml_options)


# ----- printing the results ---------------------------------------------------------------------
def cmd_methods(_) -> None:
    from .config import AdapterConfig
    from .methods import METHODS

    common = AdapterConfig.options()  # options of every method, listed once
    for method in METHODS.values():
        merge_note = "mergeable" if method.mergeable else "not mergeable"
        print(f"{method.name}  [{method.family}, {merge_note}]  {method.summary}")
        for o in method.config_class.options():
            if o.name not in {c.name for c in common}:
                print(f"    {o.flag:<22} {o.type_name:<24} default {o.default!r:<10} {o.help}")
    print("every method")
    for o in common:
        print(f"    {o.flag:<22} {o.type_name:<24} default {o.default!r:<10} {o.help}")


def run_command(command: str, settings) -> int:
    if command == "info":
        from .recipes.info import info

        print("\n".join(info(settings)))
    elif command == "inspect":
        from .recipes.inspect import inspect, render

        print(render(inspect(settings), settings.json))
    elif command == "train":
        from .recipes.train import train

        run = train(settings)
        if run:  # the main process
            print(f"loss {run['first_loss']:.4f} -> {run['final_loss']:.4f}; adapter ({run['adapter']}) saved in "
                  f"{settings.output}")
    elif command == "generate":
        from .recipes.generate import run_generate

        run_generate(settings)
    elif command == "eval":
        from .recipes.evaluate import format_table, run_eval

        results = run_eval(settings)
        print(format_table(results))
        print(f"written: {results['output']}/results.json, {results['output']}/predictions.jsonl")
    elif command == "verify":
        from .recipes.verify import verify

        failed: list[str] = []
        if not verify(settings, report=lambda line: (print(line), line.startswith("FAIL") and failed.append(line))):
            raise AdapterkitError(f"{settings.adapter} failed verification: {failed[0].removeprefix('FAIL').strip()}")
    elif command == "merge":
        from .recipes.merge import merge

        drift = merge(settings)
        print(f"merged checkpoint written to {settings.output} (largest logit change merged vs unmerged: "
              f"{drift:.2e})")
    elif command == "combine":
        from .recipes.combine import combine

        done = combine(settings)
        print(f"{done['how']} of {len(done['adapters'])} adapters written to {done['output']} ({done['method']}, rank "
              f"{done['rank']}; largest probe logit change {done['max_logit_change']:.3g})")
    elif command == "export":
        from .recipes.export import export

        out = export(settings)
        if settings.format == "peft":
            print(f"PEFT adapter written to {out}; load it with peft.PeftModel.from_pretrained(base_model, "
                  f"{str(out)!r})")
        else:
            print(f"{settings.format} export written to {out}")
    elif command == "check":
        from .recipes.check import check

        lines = check(settings)
        print("\n".join(lines) or f"ok: {settings.target} can serve {settings.adapter} as it is")
        return 1 if lines else 0
    elif command == "study":
        from .recipes.study import study

        study(settings)
        print(f"leaderboard: {settings.output}/leaderboard.md; plots: {settings.output}/plots/")
    elif command == "serve":
        from .recipes.serve import serve

        serve(settings)
    elif command == "plan":
        from .recipes.plan import plan, render

        print(render(plan(settings), settings.json))
    elif command == "demo":
        from .recipes.demo import run_demo

        run_demo(settings)
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """The benchmark against PEFT (it needs PEFT, the reference)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise AdapterkitError("the benchmark compares with PEFT, which is not installed: pip install peft")
    from .bench.train_speed import main as bench_main

    return bench_main(bench_args) or 0


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--learning-rate -1e-3` as `--learning-rate=-1e-3` (and `--weights -1,0.5`): argparse would read -1e-3 as
    a flag."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse(argv: list[str]) -> tuple[str, object]:
    """(command, its settings), or AdapterkitError / SystemExit (usage errors, --help)."""
    if argv and argv[0] in ("train", "eval"):
        argv = [argv[0], *translate(argv[0], argv[1:])]  # LLM-Adapters' own flags
    args = vars(build_parser().parse_args(join_negative_numbers(argv)))
    command = args.pop("command")
    if command == "methods":
        return command, None
    if command == "train":
        method_flags = {k[len(METHOD_OPTION):]: args.pop(k) for k in list(args) if k.startswith(METHOD_OPTION)}
        return command, train_settings(args, method_flags, args.pop("config", None))
    cls = _commands()[command][1]
    return command, cls(**_typed(cls, args))


def _one_line_warnings() -> None:
    """adapterkit's warnings as `adapterkit: warning: ...` lines; other libraries' stay as they are."""
    import warnings

    from .errors import AdapterkitWarning

    shown = warnings.showwarning
    if getattr(shown, "adapterkit", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AdapterkitWarning):
            print(f"adapterkit: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.adapterkit = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_line_warnings()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # its flags are the script's own
            return cmd_bench(argv[1:])
        command, settings = parse(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    except AdapterkitError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return cmd_methods(settings) or 0 if command == "methods" else run_command(command, settings)
    except AdapterkitError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
