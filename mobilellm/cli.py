"""The `mobilellm` command: each subcommand is a typed function whose docstring is its help.

A function's positional parameters become positional arguments, keyword-only ones become --flags
(bool -> switch, list[...] -> several values); the first docstring paragraph is the one-line help and
`name: text` lines under "Args:" describe the flags.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

# name -> "module:function". Only finished commands are listed here.
COMMANDS: dict[str, str] = {
    "info": "mobilellm.commands.info:info",
    "fetch": "mobilellm.commands.fetch:fetch",
    "convert": "mobilellm.commands.convert:convert",
    "corpus": "mobilellm.commands.corpus:corpus",
    "tokenize": "mobilellm.commands.tokenize:tokenize",
    "pretrain": "mobilellm.commands.pretrain:pretrain",
    "plot": "mobilellm.commands.plot:plot",
    "quantize": "mobilellm.commands.quantize:quantize",
    "qat": "mobilellm.commands.quantize:qat",
    "generate": "mobilellm.commands.generate:generate",
    "chat": "mobilellm.commands.generate:chat",
    "kv-cache": "mobilellm.commands.kv_cache:kv_cache",
    "eval": "mobilellm.commands.eval:run_eval",
    "eval-compare": "mobilellm.commands.eval:eval_compare",
    "needle": "mobilellm.commands.needle:needle",
    "lm-eval-hook": "mobilellm.commands.lm_eval_hook:lm_eval_hook",
}


def _arg_docs(doc: str) -> dict[str, str]:
    docs, in_args = {}, False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        m = re.match(r"\s+(\w+):\s*(.*)", line) if in_args else None
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def _add_parameter(parser: argparse.ArgumentParser, param: inspect.Parameter, hint, help_text: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    kwargs: dict = {"help": help_text}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["type"] = args[0] if args else str
    elif hint in (int, float, str, Path):
        kwargs["type"] = hint
    flag = "--" + param.name.replace("_", "-")
    if param.kind is inspect.Parameter.KEYWORD_ONLY:
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
            if hint is not bool and param.default is not None:
                kwargs["help"] = f"{help_text} (default: {param.default})".strip()
        parser.add_argument(flag, dest=param.name, **kwargs)
    else:
        if param.default is not inspect.Parameter.empty:
            kwargs["nargs"] = "?"
            kwargs["default"] = param.default
        parser.add_argument(param.name, **kwargs)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="mobilellm", description="MobileLLM-Pro end to end: train, distill, quantize, evaluate and run small language models on a CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    functions = {}
    for name, target in COMMANDS.items():
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        doc = inspect.getdoc(func) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        description = doc.split("\nArgs:")[0]
        p = sub.add_parser(name, help=summary, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        hints = typing.get_type_hints(func)
        docs = _arg_docs(doc)
        for param in inspect.signature(func).parameters.values():
            _add_parameter(p, param, hints.get(param.name, str), docs.get(param.name, ""))
        functions[name] = func
    return parser, functions


def main(argv: list[str] | None = None) -> int:
    parser, functions = build_parser()
    ns = vars(parser.parse_args(argv))
    command = ns.pop("command")
    if command is None:
        parser.print_help()
        return 0
    try:
        result = functions[command](**ns)
    except (ValueError, FileNotFoundError) as err:
        # Errors we raise name the problem; a traceback would only bury it.
        print(f"mobilellm {command}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
