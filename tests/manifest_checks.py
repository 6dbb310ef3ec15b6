"""Checks shared by the compose and Kubernetes tests: commands parsed by Ferry's own CLI
parser (a wrong subcommand or flag fails), shell scripts' `ferry` lines, pinned images."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex

from ferry.cli import _parser

_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}"}
_REDIRECTS = {">", ">>", "<", ">&", "<&", "&>"}
_DEFAULT = re.compile(r"\$\{(\w+):?=([^}]*)\}")  # ${NAME:=default}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def parse_ferry(argv: list[str]) -> argparse.Namespace | None:
    """`argv` parsed as `ferry` parses it (None for --help); AssertionError naming the
    mistake when ferry would refuse it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return _parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0:
                return None
            reason = (err.getvalue().strip().splitlines() or ["refused"])[-1]
            raise AssertionError(f"`ferry {shlex.join(argv)}`: {reason}") from None


def ferry_invocations(script: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The argument lists of every `ferry ...` simple command in a POSIX shell script, with
    $NAME expanded from `env` over the script's own `${NAME:=default}`s."""
    values = {**dict(_DEFAULT.findall(script)), **(env or {})}
    script = re.sub(r"\\\n", " ", script)
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    lexer = shlex.shlex(" ; ".join(lines), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = iter(lexer)
    for token in tokens:
        if token in _OPERATORS:
            commands.append([])
        elif token in _REDIRECTS:  # drop it, its target and a file descriptor before it
            next(tokens, None)
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()
        elif not (token in _KEYWORDS and not commands[-1]):
            commands[-1].append(_VARIABLE.sub(
                lambda m: values.get(m.group(1) or m.group(2), m.group(0)), token))
    return [c[1:] for c in commands if c and c[0] == "ferry"]


def image_pinned(image: str) -> bool:
    """A tag that names a version (or a digest): never `latest`, never none."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)
