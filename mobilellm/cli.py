"""The `mobilellm` command: each subcommand is a typed function whose docstring is its help.

A function's positional parameters become positional arguments, keyword-only ones become --flags
(bool -> switch, list[...] -> several values); the first docstring paragraph is the one-line help and
`name: text` lines under "Args:" describe the flags. A keyword parameter typed as a frozen dataclass (e.g.
`sampling: SamplingConfig`) is expanded into one flag per field, documented by the dataclass's own
docstring, and rebuilt before the call: commands that share a config share its flags.

Bad input never ends in a traceback: a bad flag (no command takes a negative number: int and float
flags refuse one), a `UserError` (what every reader of a file raises, naming the file and the field) or
an OS error on a file is printed as one line, `mobilellm COMMAND: error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

from .errors import UserError


class _ParseError(Exception):
    pass


def _literal(text: str) -> str:
    """Text for an argument's or a command's help: argparse %-formats those, so a `%` must reach it as `%%`."""
    return text.replace("%", "%%")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions shown as written: argparse %-formats one only when it holds `%(prog)`; never ours."""

    def _format_text(self, text):
        return super()._format_text(_literal(text) if "%(prog)" in text else text)


class _Parser(argparse.ArgumentParser):
    """Parse errors raised (main prints them as one line), not printed with the usage and exited on."""

    def error(self, message):
        raise _ParseError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _non_negative(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse

# name -> "module:function". Only finished commands are listed here.
COMMANDS: dict[str, str] = {
    "info": "mobilellm.commands.info:info",
    "fetch": "mobilellm.commands.fetch:fetch",
    "convert": "mobilellm.commands.convert:convert",
    "export": "mobilellm.commands.export:export",
    "corpus": "mobilellm.commands.corpus:corpus",
    "tokenize": "mobilellm.commands.tokenize:tokenize",
    "tokenize-slurm": "mobilellm.commands.tokenize:tokenize_slurm",
    "pretrain": "mobilellm.commands.pretrain:pretrain",
    "mix": "mobilellm.commands.mix:mix",
    "plot": "mobilellm.commands.plot:plot",
    "specialize": "mobilellm.commands.merge:specialize",
    "merge": "mobilellm.commands.merge:merge",
    "merge-search": "mobilellm.commands.merge:merge_search",
    "quantize": "mobilellm.commands.quantize:quantize",
    "qat": "mobilellm.commands.quantize:qat",
    "sft": "mobilellm.commands.sft:sft",
    "dpo": "mobilellm.commands.sft:dpo",
    "sft-data": "mobilellm.commands.sft:sft_data",
    "generate": "mobilellm.commands.generate:generate",
    "chat": "mobilellm.commands.generate:chat",
    "serve": "mobilellm.commands.serve:serve",
    "kv-cache": "mobilellm.commands.kv_cache:kv_cache",
    "eval": "mobilellm.commands.eval:run_eval",
    "eval-compare": "mobilellm.commands.eval:eval_compare",
    "needle": "mobilellm.commands.needle:needle",
    "extend-context": "mobilellm.commands.long_context:extend_context",
    "position-loss": "mobilellm.commands.long_context:position_loss",
    "retrieval": "mobilellm.commands.long_context:retrieval",
    "pipeline": "mobilellm.commands.pipeline:pipeline",
    "lm-eval-hook": "mobilellm.commands.lm_eval_hook:lm_eval_hook",
}


def _arg_docs(doc: str) -> dict[str, str]:
    """`name: text` lines under "Args:"; a more deeply indented line continues the text above it."""
    docs, in_args, last, indent = {}, False, None, 0
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args or not line.strip():
            continue
        m = re.match(r"(\s+)(\w+):\s*(.*)", line)
        if m and (last is None or len(m.group(1)) <= indent):
            last, indent = m.group(2), len(m.group(1))
            docs[last] = m.group(3)
        elif last is not None:
            docs[last] += " " + line.strip()
    return docs


def _add_parameter(parser, param: inspect.Parameter, hint, help_text: str, dest: str | None = None):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    kwargs: dict = {"help": _literal(help_text)}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["type"] = _non_negative(args[0]) if args and args[0] in (int, float) else (args[0] if args else str)
    elif hint in (int, float):
        kwargs["type"] = _non_negative(hint)
    elif hint in (str, Path):
        kwargs["type"] = hint
    flag = "--" + param.name.rstrip("_").replace("_", "-")  # from_ -> --from (a Python keyword)
    if param.kind is inspect.Parameter.KEYWORD_ONLY:
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
            if hint is not bool and param.default is not None:
                kwargs["help"] = f"{kwargs['help']} {_literal(f'(default: {param.default})')}".strip()
        if dest:
            kwargs["metavar"] = param.name.upper()
        parser.add_argument(flag, dest=dest or param.name, **kwargs)
    else:
        if param.default is not inspect.Parameter.empty:
            kwargs["nargs"] = "*" if origin in (list, tuple) else "?"
            kwargs["default"] = param.default
        parser.add_argument(param.name, **kwargs)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="mobilellm", description="MobileLLM-Pro end to end: train, distill, quantize, evaluate and run small language models on a CPU.",
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    functions = {}
    for name, target in COMMANDS.items():
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        doc = inspect.getdoc(func) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        description = doc.split("\nArgs:")[0]
        p = sub.add_parser(name, help=_literal(summary), description=description, formatter_class=_Formatter)
        hints = typing.get_type_hints(func)
        docs = _arg_docs(doc)
        for param in inspect.signature(func).parameters.values():
            hint = hints.get(param.name, str)
            if dataclasses.is_dataclass(hint):
                _add_dataclass(p, param, hint, docs.get(param.name, ""))
            else:
                _add_parameter(p, param, hint, docs.get(param.name, ""))
        functions[name] = func
    return parser, functions


def _add_dataclass(parser: argparse.ArgumentParser, param: inspect.Parameter, cls, help_text: str) -> None:
    """One --flag per field of `cls`, with the field's default; dest `param.field` (rebuilt by `_collect`)."""
    group = parser.add_argument_group(param.name, help_text or None)
    docs, hints = _arg_docs(inspect.getdoc(cls) or ""), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        field_param = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        _add_parameter(group, field_param, hints[f.name], docs.get(f.name, ""), dest=f"{param.name}.{f.name}")


def _collect(ns: dict, func) -> dict:
    """Rebuild the dataclass parameters from their expanded flags."""
    hints = typing.get_type_hints(func)
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            prefix = f"{name}."
            fields = {k[len(prefix):]: ns.pop(k) for k in list(ns) if k.startswith(prefix)}
            ns[name] = hint(**fields)
    return ns


def main(argv: list[str] | None = None) -> int:
    parser, functions = build_parser()
    try:
        ns = vars(parser.parse_args(argv))
    except _ParseError as err:
        print(err, file=sys.stderr)
        return 2
    command = ns.pop("command")
    if command is None:
        parser.print_help()
        return 0
    try:
        result = functions[command](**_collect(ns, functions[command]))
    except (UserError, ValueError, OSError) as err:
        # Errors we raise name the problem; a traceback would only bury it.
        print(f"mobilellm {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
