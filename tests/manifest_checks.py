"""Checks shared by the compose and Kubernetes tests: commands parsed by Ferry's own CLI
parser (a wrong subcommand or flag fails), shell scripts' `ferry` lines, pinned images, the
Kafka principal each component connects as."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from unittest import mock

from ferry import kafka_acls
from ferry.cli import _parser

_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}"}
_REDIRECTS = {">", ">>", "<", ">&", "<&", "&>"}
_DEFAULT = re.compile(r"\$\{(\w+):?=([^}]*)\}")  # ${NAME:=default}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def parse_ferry(argv: list[str], env: Mapping[str, str] | None = None
                ) -> argparse.Namespace | None:
    """`argv` parsed as `ferry` parses it (None for --help); AssertionError naming the
    mistake when ferry would refuse it. With `env`, flags' environment defaults (such as
    FERRY_ROUTER_INSTANCE_ID) are read from it, as in the container, not from the tests'."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            _container_environ(env):
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


@contextlib.contextmanager
def _container_environ(env: Mapping[str, str] | None):  # type: ignore[no-untyped-def]
    if env is None:
        yield
        return
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith(("FERRY_", "KAFKA_"))]:
            del os.environ[name]
        os.environ.update(env)
        yield


# The Kafka principal of each component's `ferry` command (ferry/kafka_acls.py); any other
# command (`ferry keys`, `ferry route`: the bootstrap job's) is the operator's, ferry-control.
PRINCIPALS = {"router": kafka_acls.ROUTER, "worker": kafka_acls.WORKER,
              "gateway": kafka_acls.GATEWAY, "deployer": kafka_acls.DEPLOYER,
              "comparator": kafka_acls.COMPARATOR}
KAFKA_VARS = ("FERRY_KAFKA_SECURITY_PROTOCOL", "FERRY_KAFKA_SASL_MECHANISM",
              "FERRY_KAFKA_USERNAME", "FERRY_KAFKA_PASSWORD")
CREDENTIALS = ("FERRY_KAFKA_USERNAME", "FERRY_KAFKA_PASSWORD")


def principals(commands: Iterable[argparse.Namespace | None]) -> set[str]:
    """The principals a process running these commands needs (one, when it is right)."""
    return {PRINCIPALS.get(c.command, kafka_acls.CONTROL) for c in commands if c is not None
            and c.command not in ("model", "schemas")}  # these two never touch Kafka
