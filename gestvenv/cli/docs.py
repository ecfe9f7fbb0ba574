"""Man pages and shell completion scripts, generated from the click definitions.

    python3 -m gestvenv.cli.docs --out DIR

writes ``DIR/man/gestvenv.1`` (the overview: configuration, environment, files, exit status),
one page per top-level command or group (``gestvenv-ephemeral.1``, ``gestvenv-run.1``...: so
``man gestvenv run`` works) and click's completion scripts for bash, zsh and fish
(``DIR/completions/``), which ask the installed ``gestvenv`` at completion time. Every command
and option comes from the click tree itself, so the pages cannot drift from the code.

The output is reproducible: the date in ``.TH`` is SOURCE_DATE_EPOCH's, or none at all.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.shell_completion import BashComplete, FishComplete, ShellComplete, ZshComplete

from .. import __version__, config, distfiles, storage, timer
from ..exceptions import CommandNotExecutableError, CommandNotFoundError, GestvenvError
from ..names import MAX_NAME_LENGTH
from ..runtime.systemd import plan
from . import cli
from ._common import Terminated, handle_errors
from ._complete import complete_env_name

PROG = "gestvenv"
COMPLETE_VAR = "_GESTVENV_COMPLETE"
MANUAL = "gestvenv manual"

# --- roff ------------------------------------------------------------------------------------

# Characters that mean something to roff, or that groff renders as typographic glyphs (a "'"
# becomes a curly quote, "-" a hyphen): escaped so that commands copied from a page still work.
_ESCAPES = {"\\": r"\(rs", "-": r"\-", "'": r"\(aq", "`": r"\(ga", '"': r"\(dq",
            "^": r"\(ha", "~": r"\(ti", "\t": " "}


def roff(text: str) -> str:
    """``text`` as roff input: special characters escaped, non-ASCII as ``\\[uXXXX]``, control
    characters dropped. For text inside a line; :func:`text_line` makes a whole line safe."""
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code > 127:
            out.append(f"\\[u{code:04X}]")
        elif code >= 32:
            out.append(char)
    return "".join(out)


def text_line(line: str) -> str:
    """A roff input line that is text, never a request: a leading "." (or "'", though
    :func:`roff` never leaves one) would make it a request, so it is preceded by ``\\&``."""
    return "\\&" + line if line.startswith((".", "'")) else line


def bold(text: str) -> str:
    """A literal (command, option, path): bold, and not broken across lines (``\\~``)."""
    return "\\fB" + roff(text).replace(" ", "\\~") + "\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def inline(text: str) -> str:
    """Prose: escaped, with `backquoted` commands in bold."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # unbalanced: keep the backquotes as they are
        return roff(text)
    return "".join(bold(p) if i % 2 else roff(p) for i, p in enumerate(parts))


def usage_words(text: str) -> str:
    """A usage fragment (``[OPTIONS] NAME COMMAND...``): metavariables in italics."""
    return re.sub(r"[A-Z][A-Z0-9_]*(?:=[A-Z][A-Z0-9_]*)?",
                  lambda m: f"\\fI{m.group(0)}\\fR", roff(text))


def help_blocks(help_text: str | None) -> list[tuple[bool, list[str]]]:
    """click's help as (verbatim, lines) paragraphs: a paragraph whose first line is ``\\b``
    must not be rewrapped; text after ``\\f`` is not help (click's own rules)."""
    text = inspect.cleandoc(help_text or "").partition("\f")[0]
    blocks: list[tuple[bool, list[str]]] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.splitlines()
        if lines and lines[0].strip() == "\b":
            if len(lines) > 1:
                blocks.append((True, [line.rstrip() for line in lines[1:]]))
        elif block.strip():
            blocks.append((False, [" ".join(line.strip() for line in lines if line.strip())]))
    return blocks


def render_help(help_text: str | None, para: str = ".PP") -> list[str]:
    """Help text as roff lines; ``para`` separates paragraphs (``.IP`` inside a ``.TP``)."""
    out: list[str] = []
    for i, (verbatim, lines) in enumerate(help_blocks(help_text)):
        if i:
            out.append(para)
        if verbatim:
            out += [".RS 4", ".nf"]
            out += [text_line(roff(line)) if line else ".sp" for line in lines]
            out += [".fi", ".RE"]
        else:
            out.append(text_line(inline(lines[0])))
    return out


def summary(help_text: str | None) -> str:
    """The first sentence of a help text, as a man page's NAME line wants it: no final period,
    a lower-case initial (unless the first word is an acronym or a metavariable)."""
    blocks = help_blocks(help_text)
    first = blocks[0][1][0] if blocks and not blocks[0][0] else ""
    sentence = re.split(r"(?<=\.)\s", first, maxsplit=1)[0].rstrip(".")
    if len(sentence) > 1 and sentence[1].islower():
        sentence = sentence[0].lower() + sentence[1:]
    return sentence


# --- the click tree --------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """A command of the tree, with the context click would give it (never invoked)."""

    path: tuple[str, ...]  # ("gestvenv", "ephemeral", "create")
    command: click.Command
    ctx: click.Context

    @property
    def name(self) -> str:
        return " ".join(self.path)

    @property
    def is_group(self) -> bool:
        return isinstance(self.command, click.Group)


def root() -> Node:
    return Node((PROG,), cli, click.Context(cli, info_name=PROG, **cli.context_settings))


def children(node: Node) -> list[Node]:
    group = node.command
    if not isinstance(group, click.Group):
        return []
    # In the order they were declared (create, list, show...), not click's alphabetical one.
    declared = list(getattr(group, "commands", {}))
    names = sorted(group.list_commands(node.ctx),
                   key=lambda n: declared.index(n) if n in declared else len(declared))
    out = []
    for name in names:
        command = group.get_command(node.ctx, name)
        if command is None or command.hidden:
            continue
        ctx = click.Context(command, info_name=name, parent=node.ctx, **command.context_settings)
        out.append(Node((*node.path, name), command, ctx))
    return out


def walk(node: Node | None = None) -> Iterator[Node]:
    """``node`` (the whole tree by default) and every command below it, depth first."""
    node = node or root()
    yield node
    for child in children(node):
        yield from walk(child)


def visible_params(node: Node, *, with_help: bool = True) -> list[click.Parameter]:
    """The parameters a user can give (the help option included unless ``with_help``)."""
    help_option = node.command.get_help_option(node.ctx)  # click 8.1: a new object each call
    help_opts = help_option.opts if help_option is not None and not with_help else None
    return [p for p in node.command.get_params(node.ctx)
            if not getattr(p, "hidden", False) and p.opts != help_opts]


def usage(node: Node) -> str:
    pieces = " ".join(node.command.collect_usage_pieces(node.ctx))
    return f"{bold(node.name)} {usage_words(pieces)}".rstrip()


# --- parameters ------------------------------------------------------------------------------

# What an argument is, by its name (click arguments carry no help of their own).
ARGUMENT_HELP = {
    "name": "An environment name: ASCII letters, digits, `_`, `.` and `-`, starting with a "
            f"letter or digit, at most {MAX_NAME_LENGTH} characters.",
    "names": "Environment names.",
    "command": "The command to run and its arguments: everything after the options, "
               "after a `--` or not.",
    "key": "A configuration key (see CONFIGURATION in gestvenv(1)).",
    "value": "A TOML value (`3600`, `true`, `[\"a\", \"b\"]`); anything else is taken as a "
             "string.",
}


def is_flag(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and (param.is_flag or param.count)


def metavar(param: click.Parameter) -> str:
    """What follows an option, or names an argument: as click's ``--help`` says it, except
    that ranges are plain INTEGER/FLOAT (the range is said after)."""
    kind = param.type
    if param.metavar:
        return param.metavar
    if isinstance(param, click.Argument):
        return (param.name or "").upper()
    if isinstance(kind, click.IntRange):
        return "INTEGER"
    if isinstance(kind, click.FloatRange):
        return "FLOAT"
    return kind.name.upper()


def _short_first(opts: Sequence[str]) -> list[str]:
    """``-h, --help`` whatever the declaration order (click's --help sorts them so too)."""
    return sorted(opts, key=lambda o: o.startswith("--"))


def param_tag(param: click.Parameter) -> str:
    """The ``.TP`` tag: ``-p, --packages SPECS``, ``--user / --system``, ``NAME...``."""
    if isinstance(param, click.Argument):
        repeat = "..." if param.nargs != 1 else ""
        return italic(metavar(param) + repeat)
    names = ", ".join(bold(o) for o in _short_first(param.opts))
    if param.secondary_opts:
        names += " / " + ", ".join(bold(o) for o in _short_first(param.secondary_opts))
    if is_flag(param):
        return names
    if isinstance(param.type, click.Choice):
        return f"{names} " + "|".join(italic(str(c)) for c in param.type.choices)
    return f"{names} {italic(metavar(param))}"


def _range(kind: click.ParamType[Any]) -> str | None:
    if not isinstance(kind, click.IntRange | click.FloatRange):
        return None
    bounds = []
    if kind.min is not None:
        bounds.append(f"{'>' if kind.min_open else '>='} {kind.min}")
    if kind.max is not None:
        bounds.append(f"{'<' if kind.max_open else '<='} {kind.max}")
    return " and ".join(bounds) or None


def _default(param: click.Parameter) -> str | None:
    """The default worth saying: a plain value (not None, not a flag's off, not click's
    'unset' marker, not something computed at run time)."""
    value = param.default
    if is_flag(param) or callable(value):
        return None
    if isinstance(value, tuple | list) and value and all(type(v) in (int, float, str)
                                                          for v in value):
        return ", ".join(str(v) for v in value)
    if type(value) in (int, float, str) and value != "":
        return str(value)
    return None


def param_facts(param: click.Parameter, help_text: str = "") -> list[str]:
    """Sentences about a parameter that its help does not say: type, choices, default..."""
    facts = []
    kind = param.type
    if isinstance(param, click.Argument):
        if param.nargs == -1:
            facts.append("One or more." if param.required else "Any number, or none.")
        elif not param.required:
            facts.append("Optional.")
    elif param.required:
        facts.append("Required.")
    if isinstance(kind, click.Choice):
        facts.append("One of: " + ", ".join(f"`{c}`" for c in kind.choices) + ".")
    if (bounds := _range(kind)) is not None:
        facts.append(f"A number {bounds}.")
    if isinstance(kind, click.Path) and kind.exists:
        facts.append("It must exist.")
    if getattr(param, "multiple", False) and "repeatable" not in help_text.lower():
        facts.append("Repeatable.")
    if (default := _default(param)) is not None:
        facts.append(f"Default: `{default}`.")
    envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
    if names := [e for e in envvars if e]:
        facts.append("Environment variable: " + ", ".join(f"`{e}`" for e in names) + ".")
    if getattr(param, "_custom_shell_complete", None) is complete_env_name:
        facts.append("The shell completes it with the names of your environments.")
    return facts


def render_param(param: click.Parameter) -> list[str]:
    help_text = getattr(param, "help", None)
    if isinstance(param, click.Argument):
        help_text = ARGUMENT_HELP.get(param.name or "")
    lines = [".TP", param_tag(param)]
    body = render_help(help_text, ".IP") if help_text else []
    facts = " ".join(param_facts(param, help_text or ""))
    if body and not body[-1].endswith((".", "!", "?", ".RE")):
        body[-1] += "."
    if facts:
        if body and body[-1] == ".RE":  # after a verbatim block: a paragraph of their own
            body.append(".IP")
            body.append(text_line(inline(facts)))
        elif body:
            body[-1] = f"{body[-1]} {inline(facts)}"
        else:
            body.append(text_line(inline(facts)))
    return lines + (body or [text_line(roff("(No description.)"))])


def render_params(params: Sequence[click.Parameter]) -> list[str]:
    """Arguments first (as in the usage line), then options."""
    ordered: list[click.Parameter] = [p for p in params if isinstance(p, click.Argument)]
    ordered += [p for p in params if not isinstance(p, click.Argument)]
    return [line for p in ordered for line in render_param(p)]


# --- pages -----------------------------------------------------------------------------------

def page_date(environ: dict[str, str] | None = None) -> str:
    """SOURCE_DATE_EPOCH as a date (UTC), or "" when unset: never the clock."""
    environ = dict(os.environ) if environ is None else environ
    epoch = environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return ""
    if not epoch.isdigit():
        raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds")
    try:
        when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    except (OverflowError, OSError):
        raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r} is out of range") from None
    return when.strftime("%Y-%m-%d")


def page_name(node: Node) -> str:
    return "-".join(node.path)


def header(title: str, date: str, what: str) -> list[str]:
    return [
        '.\\" Generated by "python3 -m gestvenv.cli.docs" from the click definitions.',
        '.\\" Do not edit: change the code and regenerate.',
        f'.TH {roff(title.upper())} 1 "{roff(date)}" "{roff(PROG)} {roff(__version__)}" '
        f'"{roff(MANUAL)}"',
        # Commands, paths and options are copied from pages: never hyphenated, and left-aligned
        # rather than justified around them (as DocBook's pages do).
        ".nh",
        ".ad l",
        ".SH NAME",
        f"{roff(title)} \\- {inline(what)}",
    ]


def section(title: str, lines: list[str]) -> list[str]:
    return [f".SH {title}", *lines] if lines else []


def synopsis(nodes: Sequence[Node]) -> list[str]:
    return section("SYNOPSIS", [".nf", *(usage(n) for n in nodes), ".fi"])


def see_also(exclude: str) -> list[str]:
    pages = [f"{page_name(n)}(1)" for n in walk_top()] + [
        "systemctl(1)", "journalctl(1)", "systemd.resource-control(5)", "systemd.exec(5)",
        "systemd.timer(5)"]
    refs = [f"{bold(name)}({sect}" for name, _, sect in (p.partition("(") for p in pages)
            if name != exclude]
    return section("SEE ALSO", [",\n".join(refs)])


def walk_top() -> list[Node]:
    """The overview page's node, then the top-level commands (one page each)."""
    top = root()
    return [top, *children(top)]


def status_of(exc: BaseException) -> int:
    """The exit status ``handle_errors`` gives a command that raises ``exc``: asked of the
    decorator itself, so that the page says what the code does."""
    @handle_errors
    def probe() -> None:
        raise exc

    with contextlib.redirect_stderr(io.StringIO()):  # the one-line report is not wanted here
        try:
            probe()
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1
        except click.ClickException as error:
            return error.exit_code
    return 0


def exit_statuses() -> dict[int, list[str]]:
    """Exit status -> what it means, for every status gestvenv itself chooses."""
    running = "`run`, `exec` or `create --interactive`"
    reasons = [
        (0, "Success."),
        (status_of(GestvenvError("x")),
         "An error, reported on one line that starts with `gestvenv: error:` (an unknown "
         "environment, an invalid setting, a limit that cannot be enforced...), or a `cleanup` "
         "that could not remove every environment it was asked to."),
        (click.UsageError("x").exit_code,
         "Wrong usage: an unknown option, a missing argument, an invalid value."),
        (status_of(CommandNotFoundError("x")),
         f"{running}: the command was not found, or is not an executable file."),
        (status_of(CommandNotExecutableError("x")),
         f"{running}: the system could not execute the command (a bad `#!` line, not a "
         "program)."),
        (status_of(KeyboardInterrupt()),
         "Interrupted by SIGINT (Ctrl-C) while gestvenv itself was working."),
        (status_of(Terminated()), f"{running}: gestvenv got SIGTERM while the command ran."),
    ]
    statuses: dict[int, list[str]] = {}
    for code, text in reasons:
        statuses.setdefault(code, []).append(text)
    return dict(sorted(statuses.items()))


def exit_status() -> list[str]:
    out = [text_line(inline(
        "`gestvenv run`, `gestvenv ephemeral exec` and a shell opened by `gestvenv ephemeral "
        "create --interactive` exit with the status of the command, as a shell would: its exit "
        "status, 128+N if signal N killed it (a Ctrl-C goes to the command, so it usually exits "
        "with 130), 124 if `--timeout` killed it. gestvenv's own statuses:"))]
    for code, texts in exit_statuses().items():
        out += [".TP", bold(str(code)), text_line(inline(" Or: ".join(texts)))]
    return section("EXIT STATUS", out)


def commands_section(node: Node) -> list[str]:
    """A group's page: every command below it, in full (nested groups too)."""
    out: list[str] = []
    for sub in list(walk(node))[1:]:
        out += [f'.SS "{roff(sub.name)}"', usage(sub), ".PP", *render_help(sub.command.help)]
        if sub.is_group:
            names = ", ".join(f"`{c.path[-1]}`" for c in children(sub))
            out += [".PP", text_line(inline(f"Commands: {names}, described below."))]
        params = visible_params(sub, with_help=False)
        if params:
            out += [".PP", *render_params(params)]
    helps = ", ".join(f"`{o}`" for o in _short_first(node.ctx.help_option_names))
    out += [".PP", text_line(inline(f"Every command also takes {helps}: show its help and "
                                    "exit."))]
    return section("COMMANDS", out)


def command_page(node: Node, date: str) -> str:
    """The page of one top-level command or group: ``gestvenv-ephemeral(1)``..."""
    leaves = [n for n in walk(node) if not n.is_group] if node.is_group else [node]
    lines = header(page_name(node), date, summary(node.command.help))
    lines += synopsis([node, *leaves] if node.is_group else leaves)
    lines += section("DESCRIPTION", render_help(node.command.help))
    params = visible_params(node)
    lines += section("ARGUMENTS", render_params([p for p in params
                                                 if isinstance(p, click.Argument)]))
    lines += section("OPTIONS", render_params([p for p in params
                                               if not isinstance(p, click.Argument)]))
    if node.is_group:
        lines += commands_section(node)
    lines += exit_status()
    lines += section("EXAMPLES", examples(EXAMPLES.get(node.path[-1], ())))
    lines += see_also(page_name(node))
    return "\n".join(lines) + "\n"


# --- the overview page -----------------------------------------------------------------------

ABOUT = [
    "gestvenv gives you ephemeral Python virtual environments: a fresh virtualenv with "
    "packages, used for one test, one CI step or one experiment, then destroyed with a "
    "guarantee: at the end of its TTL, after an idle timeout, or when the process that created "
    "it ends, even if it was killed.",
    "When systemd is PID 1 (the `systemd` runtime; `auto` picks it), each environment is a "
    "transient unit `gestvenv-NAME.service` under `gestvenv.slice`, of the system manager for "
    "root and of your own `systemd --user` otherwise. Its limits (memory, CPU, processes, "
    "network) are set on its slice `gestvenv-NAME.slice`, where each command runs as a unit "
    "`gestvenv-NAME@ID.service`; `systemctl` and `journalctl` show them. systemd ends the "
    "environment at the end of its TTL, and `gestvenv-cleanup.timer` sweeps what a crash or a "
    "power loss left behind.",
    "Without systemd, the `local` runtime runs environments as plain processes, each watched "
    "by a watchdog process of its own and all by a per-user one that every `gestvenv "
    "ephemeral` command starts when needed. A "
    "limit that a runtime cannot enforce is refused, or, if allowed (`--allow-unenforced`, "
    "`allow_unenforced_limits`), reported as not enforced by `gestvenv ephemeral show`.",
]

# Checked by the tests against the click tree: only real commands and options.
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    PROG: (
        ("An environment with a package, a command in it, then gone:",
         "gestvenv ephemeral create demo --packages 'six>=1.0' --ttl 300\n"
         "gestvenv run --env demo -- python -c 'import six'\n"
         "gestvenv ephemeral cleanup demo"),
        ("A shell in a throw-away environment, destroyed when the shell exits:",
         "gestvenv ephemeral create --packages requests --interactive"),
        ("Let systemd sweep expired and orphaned environments every 5 minutes:",
         "gestvenv ephemeral timer install --interval 300"),
        ("Make environments live 10 minutes by default:",
         "gestvenv config set default_ttl 600"),
    ),
    "ephemeral": (
        ("An environment limited to 512 MB and 50% of a CPU, without network:",
         "gestvenv ephemeral create lim --memory 512 --cpu 50 --no-network\n"
         "gestvenv ephemeral show lim"),
        ("Run pytest in it, killed after 5 minutes:",
         "gestvenv ephemeral exec lim --timeout 300 -- pytest tests/"),
        ("Remove everything past its TTL, and what crashed processes left:",
         "gestvenv ephemeral cleanup --expired --orphans"),
    ),
    "run": (
        ("Run the tests of the current directory in environment ci-test:",
         "gestvenv run --env ci-test -- pytest tests/"),
    ),
    "config": (
        ("Where each setting comes from:", "gestvenv config show"),
        ("Use the local runtime for every user (as root):",
         "gestvenv config set --system runtime local"),
    ),
}

CONFIG_EXAMPLE = """\
[ephemeral]
default_ttl = 600
max_concurrent = 10
storage_backend = "tmpfs"
find_links = ["/srv/wheels"]
"""


def examples(items: Sequence[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for i, (what, commands) in enumerate(items):
        out += [".PP"] if i else []
        out += [text_line(inline(what)), ".PP", ".RS 4", ".nf"]
        out += [text_line(roff(line)) for line in commands.splitlines()]
        out += [".fi", ".RE"]
    return out


def _toml(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


def _capitalize(text: str, literals: Sequence[str]) -> str:
    """A help fragment as a sentence; one that starts with a value (`uv, or...`) stays as is."""
    first = re.split(r"[\s,:;]", text, maxsplit=1)[0]
    return text if first in literals else text[:1].upper() + text[1:]


def configuration() -> list[str]:
    """Every key of config.OPTIONS with what it is, what it accepts and its default."""
    precedence = (config.__doc__ or "").splitlines()[0].partition(": ")[2].rstrip(".")
    env = config.ENV_PREFIX
    out = [text_line(inline(
        f"Settings are read from the `[{config.TABLE}]` table of two TOML files: the system's, "
        "`/etc/gestvenv/config.toml` (or the file `GESTVENV_SYSTEM_CONFIG` names), and yours, "
        "`$XDG_CONFIG_HOME/gestvenv/config.toml` (`~/.config/gestvenv/config.toml` when "
        "`XDG_CONFIG_HOME` is not set; or the file `GESTVENV_CONFIG` names). A missing file is "
        f"no error. Each key can also be set by a variable `{env}<KEY>`, the key in upper case "
        "(a list: items separated by spaces); options on the command line override all that. "
        f"Precedence, lowest first: {precedence}.")),
        ".PP",
        text_line(inline("`gestvenv config show` prints each effective value and where it "
                         "comes from; `gestvenv config set` and `unset` edit a file and keep "
                         "its comments. An example file:")),
        ".PP", ".RS 4", ".nf",
        *(text_line(roff(line)) for line in CONFIG_EXAMPLE.splitlines()),
        ".fi", ".RE", ".PP", text_line(inline("The keys:"))]
    defaults = config.Config().as_dict()
    for key, option in config.OPTIONS.items():
        allowed = option.parse.__doc__ or "see `gestvenv config set`"
        what = _capitalize(option.help, literals=re.findall(r"'([^']*)'", allowed))
        out += [".TP", f"{bold(key)} (\\fB{roff(env + key.upper())}\\fR)",
                text_line(inline(f"{what}. Allowed: {allowed}. Default: {_toml(defaults[key])}."))]
    return section("CONFIGURATION", out)


ENVIRONMENT = (
    ("GESTVENV_CONFIG", "Your configuration file, instead of "
                        "`$XDG_CONFIG_HOME/gestvenv/config.toml`."),
    ("GESTVENV_SYSTEM_CONFIG", "The system configuration file, instead of "
                               "`/etc/gestvenv/config.toml`."),
    (config.ENV_PREFIX + "<KEY>", "A setting; see CONFIGURATION."),
    ("GESTVENV_RUNTIME_DIR", "The runtime directory (state files, locks), instead of the one "
                             "described in FILES."),
    ("XDG_CONFIG_HOME", "Where your configuration file is (default `~/.config`), and where "
                        "`gestvenv ephemeral timer install --user` writes its units "
                        "(`$XDG_CONFIG_HOME/systemd/user`)."),
    ("XDG_CACHE_HOME", "For users other than root: where disk-backed environments and the "
                       "package cache are (default `~/.cache`)."),
    ("XDG_RUNTIME_DIR", "For users other than root: the runtime directory is "
                        "`$XDG_RUNTIME_DIR/gestvenv` if that directory exists and is yours; "
                        "your systemd manager's bus is `$XDG_RUNTIME_DIR/bus`."),
    ("DBUS_SESSION_BUS_ADDRESS, DBUS_SYSTEM_BUS_ADDRESS",
     "The buses of your systemd manager and of the system manager, if not the usual ones."),
    ("SHELL", "The shell `gestvenv ephemeral create --interactive` opens (default `/bin/sh`)."),
    ("PYTHONPATH", "If set, `gestvenv ephemeral timer install` writes it into the cleanup "
                   "service's command, so that the service finds the same gestvenv."),
    ("GESTVENV_HOST", "A gestvenv service to act through, as `--host` gives it: "
                      "`unix:///run/gestvenv/api.sock` (`gestvenv serve`'s socket)."),
    ("GESTVENV_TOKEN", "The bearer token `--host` sends to a service over TCP "
                       "(`gestvenv serve --new-token` makes one)."),
    ("GESTVENV_CAFILE", "The CA certificates `--host` trusts for a service over TLS, "
                        "instead of the system's."),
    ("LISTEN_PID, LISTEN_FDS", "Set by systemd for `gestvenv serve` when its socket unit "
                               "starts it: the socket it serves (then removed from its "
                               "environment)."),
    ("UV_*", "uv's own settings apply when uv builds environments; they are part of what "
             "identifies a reusable set of installed packages."),
)


def environment() -> list[str]:
    out: list[str] = []
    for names, text in ENVIRONMENT:
        tag = ", ".join(bold(n) for n in names.split(", "))
        out += [".TP", tag, text_line(inline(text))]
    out += [".PP", text_line(inline(
        "Commands run in an environment get, on top of gestvenv's own environment: "
        "`VIRTUAL_ENV` (the environment's directory), `PATH` with the environment's `bin` "
        "first, `GESTVENV_ENV_NAME` and `GESTVENV_ENV_ID`, and the variables given to "
        "`create --env`."))]
    return section("ENVIRONMENT", out)


def storage_layout() -> list[tuple[str, str, str]]:
    """(root's path, other users' path, what) from the table in storage.py's docstring."""
    rows = []
    doc = storage.__doc__ or ""
    block = doc.partition("::")[2].split("\n\n")[1] if "::" in doc else ""
    for line in block.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 3:
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def files() -> list[str]:
    packaged = "; ".join(
        f"{'user managers' if user else 'the system manager'}: "
        + " or ".join(f"`{d}`" for d in dirs) for user, dirs in sorted(timer.PACKAGE_DIRS.items()))
    out: list[str] = []
    for as_root, as_user, what in storage_layout():
        what = what[:1].upper() + what[1:]
        out += [".TP", f"{italic(as_root)} (root), {italic(as_user)} (other users)",
                text_line(inline(what + "."))]
    out += [
        ".PP", text_line(inline(
            f"Without `XDG_RUNTIME_DIR`, a user's runtime directory is "
            f"`{storage.USER_TMP_RUNTIME_PREFIX}UID`. The "
            "`storage_root` and `cache_dir` settings move the disk-backed environments and the "
            "package cache; snapshots of installed package sets (`gestvenv-templates`) sit "
            "beside the cache.")),
        ".TP", italic("/etc/gestvenv/config.toml") + ", "
        + italic("$XDG_CONFIG_HOME/gestvenv/config.toml"),
        text_line(inline("The configuration files; see CONFIGURATION.")),
        ".TP", italic(timer.SERVICE_UNIT) + ", " + italic(timer.TIMER_UNIT),
        text_line(inline(
            f"The periodic sweep (`{PROG} {' '.join(timer.CLEANUP_ARGS)}`, also "
            f"at boot). A package installs them ({packaged}); otherwise `gestvenv ephemeral "
            f"timer install` writes them into `{timer.SYSTEM_ADMIN_DIR}` or "
            "`$XDG_CONFIG_HOME/systemd/user` (over a package's units: a drop-in that changes "
            "the interval).")),
        ".TP", italic(plan.PARENT_SLICE),
        text_line(inline(
            "The parent of every environment's slice, for a systemd manager; "
            "`max_total_memory_mb` is its `MemoryMax`. A package installs it beside the units "
            "above; without it gestvenv starts it as a transient unit.")),
        ".TP", italic("/usr/lib/tmpfiles.d/gestvenv.conf"),
        text_line(inline(
            "Installed by a package: tmpfiles.d(5) lines that create root's directories ("
            + ", ".join(f"`{d}`" for d in distfiles.ROOT_DIRS) + ") private at boot, and keep "
            f"`systemd-tmpfiles` from cleaning a user's `{storage.USER_TMP_RUNTIME_PREFIX}UID`.")),
    ]
    return section("FILES", out)


def overview_page(date: str) -> str:
    """gestvenv(1): what gestvenv is, its commands, configuration, files and exit status."""
    top = root()
    lines = header(PROG, date, summary(cli.help))
    lines += synopsis([top])
    description = render_help(cli.help)
    for paragraph in ABOUT:
        description += [".PP", text_line(inline(paragraph))]
    lines += section("DESCRIPTION", description)
    commands: list[str] = []
    for child in children(top):
        commands += [".TP", bold(" ".join(child.path[1:])),
                     text_line(inline(summary(child.command.help)[:1].upper()
                                      + summary(child.command.help)[1:] + ".")
                               + f" See \\fB{roff(page_name(child))}\\fR(1).")]
    lines += section("COMMANDS", commands)
    lines += section("OPTIONS", render_params(visible_params(top)))
    lines += configuration() + environment() + files() + exit_status()
    lines += section("EXAMPLES", examples(EXAMPLES[PROG]))
    lines += see_also(PROG)
    return "\n".join(lines) + "\n"


def man_pages(date: str | None = None) -> dict[str, str]:
    """File name -> roff text, for every page."""
    date = page_date() if date is None else date
    pages = {f"{PROG}.1": overview_page(date)}
    for node in children(root()):
        pages[f"{page_name(node)}.1"] = command_page(node, date)
    return pages


# --- completion ------------------------------------------------------------------------------

COMPLETIONS: dict[str, type[ShellComplete]] = {
    f"{PROG}.bash": BashComplete,
    f"_{PROG}": ZshComplete,
    f"{PROG}.fish": FishComplete,
}


def completion_script(cls: type[ShellComplete]) -> str:
    """click's script for one shell. ShellComplete.source() directly: BashComplete.source()
    first runs the build machine's bash to check its version, which says nothing about the
    shell of the machine the script will be used on."""
    text = ShellComplete.source(cls(cli, {}, PROG, COMPLETE_VAR))
    return text if text.endswith("\n") else text + "\n"


def completion_scripts() -> dict[str, str]:
    return {name: completion_script(cls) for name, cls in COMPLETIONS.items()}


# --- main ------------------------------------------------------------------------------------

def write_all(out: Path, date: str | None = None) -> list[Path]:
    """Write the pages and the scripts under ``out``; return the paths written."""
    written = []
    for subdir, contents in (("man", man_pages(date)), ("completions", completion_scripts())):
        (out / subdir).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            path = out / subdir / name
            path.write_text(text, encoding="ascii" if subdir == "man" else "utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m gestvenv.cli.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for man/ and completions/ (created if missing)")
    args = parser.parse_args(argv)
    try:
        paths = write_all(args.out)
    except (ValueError, OSError) as exc:
        print(f"gestvenv.cli.docs: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
