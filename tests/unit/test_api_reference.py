"""docs/api/ephemeral.md against the code: the API reference cannot drift from the API.

The reference is parsed (its format is strict, see the checks below) and compared with the real
objects, without creating any environment:

- every name of ``gestvenv.__all__`` has its heading (a line ``### `NAME` ``), and no such
  heading documents a name outside ``__all__``;
- every public method and property of the public classes has its heading
  (``#### `Class.member` ``), and every such heading names a member that exists;
- every documented callable (function, class constructor, method) has its signature in a
  ``python norun=signature`` block whose kind (``def``/``async def``/``class``), name,
  parameters (names, order, kinds) and defaults are the real ones, and its ``Parameters:``
  list names exactly the real parameters, in order;
- the fields of the dataclasses (``Fields:``), the members of the enums (``Members:``), the
  attributes of the exceptions (``Attributes:``) are the real ones;
- each exception's ``Base class:`` line and the tree of the Exceptions section are the real
  hierarchy, and every name a ``Raises`` list gives is a real exception.

:func:`check_reference` returns the problems as a list of sentences, so that the tests below can
also run it on altered inputs (a name added to ``__all__``, a parameter renamed...) and see it
report them.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import enum
import inspect
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import gestvenv
import gestvenv.exceptions

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api" / "ephemeral.md"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^(#{1,6}) +(.*?) *$")
_NAME_HEADING = re.compile(r"^`([A-Za-z_][\w.]*)`$")
_LIST_LABEL = re.compile(r"^(Parameters|Fields|Attributes|Members):$")
_RAISES_LABEL = re.compile(r"^Raises\b[^:]*:$")
_BASES = re.compile(r"^Base class(?:es)?: (.*)$")
_BULLET_NAME = re.compile(r"^- `(\*{0,2}[A-Za-z_]\w*)`")
SIGNATURE_INFO = "python norun=signature"
EXCEPTIONS_SECTION = "Exceptions"


# --- parsing the reference ---

@dataclass
class Section:
    """What one ``###`` or ``####`` heading documents, up to the next heading."""

    name: str                      # "ephemeral", "Environment.execute"
    level: int                     # 3 or 4
    line: int                      # of the heading, 1-based
    parent: str | None             # the enclosing ``###`` name, for a level 4 heading
    signatures: list[str] = field(default_factory=list)
    lists: dict[str, list[str]] = field(default_factory=dict)
    raises: list[str] = field(default_factory=list)
    bases: list[str] | None = None


@dataclass
class Reference:
    sections: list[Section]
    trees: list[str]               # the ``text`` blocks of the Exceptions section
    problems: list[str]            # what breaks the format itself


def _bullets(lines: list[str], start: int) -> tuple[list[str], list[str]]:
    """The names of the bullet list that follows a label line (``lines[start]`` is the first
    line after it), and what is wrong with its bullets."""
    names: list[str] = []
    problems: list[str] = []
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines):
        line = lines[i]
        if line.startswith("- "):
            match = _BULLET_NAME.match(line)
            if match is None:
                problems.append(f"a bullet that does not start with a `name`: {line!r}")
            else:
                names.append(match.group(1))
        elif line.startswith("  ") and names:
            pass  # the continuation of a bullet
        elif not line.strip():
            following = next((x for x in lines[i + 1:] if x.strip()), "")
            if not following.startswith("- "):
                break
        else:
            break
        i += 1
    return names, problems


def parse_reference(text: str) -> Reference:
    lines = text.splitlines()
    sections: list[Section] = []
    trees: list[str] = []
    problems: list[str] = []
    current: Section | None = None
    parent: str | None = None
    chapter = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is not None:
            marker, info = fence.group(1), fence.group(2).strip()
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != marker[0] * len(marker):
                body.append(lines[i])
                i += 1
            code = "\n".join(body)
            if info == SIGNATURE_INFO:
                if current is None:
                    problems.append(f"line {i}: a signature block outside any ### section")
                else:
                    current.signatures.append(code)
            elif info.split()[:1] == ["text"] and chapter == EXCEPTIONS_SECTION:
                trees.append(code)
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading is not None:
            level, title = len(heading.group(1)), heading.group(2)
            if level <= 2:
                chapter, current, parent = title, None, None
            elif level in (3, 4):
                named = _NAME_HEADING.match(title)
                if named is None:
                    problems.append(f"line {i + 1}: a level {level} heading must be exactly "
                                    f"{'#' * level} `NAME`, not {line!r}")
                    current = None
                else:
                    name = named.group(1)
                    if level == 3:
                        parent = name
                    current = Section(name, level, i + 1, parent if level == 4 else None)
                    sections.append(current)
            i += 1
            continue
        if current is not None:
            label = _LIST_LABEL.match(line)
            if label is not None:
                names, bad = _bullets(lines, i + 1)
                problems += [f"{current.name}, {label.group(1)}: {b}" for b in bad]
                if label.group(1) in current.lists:
                    problems.append(f"{current.name}: two {label.group(1)} lists")
                current.lists[label.group(1)] = names
            elif _RAISES_LABEL.match(line):
                names, bad = _bullets(lines, i + 1)
                problems += [f"{current.name}, Raises: {b}" for b in bad]
                current.raises += names
            elif (bases := _BASES.match(line)) is not None:
                current.bases = re.findall(r"`([^`]+)`", bases.group(1))
        i += 1
    return Reference(sections, trees, problems)


# --- parsing a signature block ---

@dataclass(frozen=True)
class DocParam:
    name: str
    kind: inspect._ParameterKind
    default: str | None            # the text after "=", or None


@dataclass(frozen=True)
class DocSignature:
    kind: str                      # "def", "async def" or "class"
    name: str
    params: tuple[DocParam, ...]


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas that are not inside brackets or strings."""
    parts: list[str] = []
    depth, quote, start = 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_SIG_HEAD = re.compile(r"^\s*(async def|def|class)\s+([A-Za-z_]\w*)\s*\(", re.S)
_PARAM = re.compile(r"^(\*{0,2})([A-Za-z_]\w*)\s*(?::\s*[^=]+?)?\s*(?:=\s*(.+))?$", re.S)


def parse_signature(code: str) -> DocSignature:
    """``async def name(a, *, b=1) -> T`` (or ``def``, ``class``), as the reference shows it;
    ValueError when it is not one."""
    head = _SIG_HEAD.match(code)
    if head is None:
        raise ValueError(f"not a signature ('def NAME(...)', 'async def', 'class'): {code!r}")
    depth, end = 0, -1
    for i in range(head.end() - 1, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"unbalanced parentheses: {code!r}")
    rest = code[end + 1:].strip()
    if rest and not rest.startswith("->"):
        raise ValueError(f"unexpected text after the parameters: {rest!r}")
    params: list[DocParam] = []
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for part in _split_top_level(code[head.end():end]):
        if part == "/":
            params = [dataclasses.replace(p, kind=inspect.Parameter.POSITIONAL_ONLY)
                      for p in params]
            continue
        if part == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        match = _PARAM.match(part)
        if match is None:
            raise ValueError(f"cannot read the parameter {part!r}")
        stars, name, default = match.groups()
        if stars == "*":
            params.append(DocParam(name, inspect.Parameter.VAR_POSITIONAL, None))
            kind = inspect.Parameter.KEYWORD_ONLY
        elif stars == "**":
            params.append(DocParam(name, inspect.Parameter.VAR_KEYWORD, None))
        else:
            params.append(DocParam(name, kind, default.strip() if default else None))
    return DocSignature(head.group(1), head.group(2), tuple(params))


# --- the real objects ---

def _is_exception(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def _own_classes(cls: type) -> Iterator[type]:
    """``cls`` and its bases that are the project's (not builtins, enum, object)."""
    for klass in cls.__mro__:
        if klass.__module__ not in ("builtins", "enum", "abc"):
            yield klass


def public_members(cls: type) -> dict[str, Any]:
    """The public methods and properties of a class, as found in its (and its bases') dicts:
    not its dataclass fields, not its enum members."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    enum_members = set(cls.__members__) if issubclass(cls, enum.Enum) else set()
    members: dict[str, Any] = {}
    for klass in reversed(list(_own_classes(cls))):
        for name, value in vars(klass).items():
            if name.startswith("_") or name in fields or name in enum_members:
                continue
            if isinstance(value, property | classmethod | staticmethod | types.FunctionType):
                members[name] = value
    return members


def _real_kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    function = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        return "async def"
    return "def"


def _real_signature(obj: Any, owner: type | None) -> inspect.Signature:
    """The signature a caller sees: without ``self``/``cls``, with the defaults of a
    dataclass's default factories made."""
    if isinstance(obj, staticmethod):
        return inspect.signature(obj.__func__)
    if isinstance(obj, classmethod):
        return inspect.signature(obj.__get__(None, owner))
    signature = inspect.signature(obj)
    params = list(signature.parameters.values())
    if owner is not None and params and params[0].name == "self":
        params = params[1:]
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        factories = {f.name: f.default_factory for f in dataclasses.fields(obj)
                     if f.default_factory is not dataclasses.MISSING}
        params = [p.replace(default=factories[p.name]()) if p.name in factories else p
                  for p in params]
    return signature.replace(parameters=params)


def _default_problem(where: str, param: str, documented: str, real: Any) -> str | None:
    if real is inspect.Parameter.empty:
        return f"{where}: parameter {param!r} has no default, the reference shows ={documented}"
    try:
        value = ast.literal_eval(documented)
    except (ValueError, SyntaxError):
        if isinstance(real, enum.Enum) and documented == f"{type(real).__name__}.{real.name}":
            return None
        return (f"{where}: parameter {param!r}: the reference shows ={documented}, "
                f"the real default is {real!r}")
    if value == real and type(value) is type(real):
        return None
    return (f"{where}: parameter {param!r}: the reference shows ={documented}, "
            f"the real default is {real!r}")


def signature_problems(where: str, code: str, obj: Any, owner: type | None,
                       name: str) -> list[str]:
    """The documented signature ``code`` against the real callable ``obj``."""
    try:
        documented = parse_signature(code)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    problems = []
    if documented.name != name:
        problems.append(f"{where}: the signature block names {documented.name!r}, not {name!r}")
    if documented.kind != _real_kind(obj):
        problems.append(f"{where}: the signature says {documented.kind!r}, the code is "
                        f"{_real_kind(obj)!r}")
    real = list(_real_signature(obj, owner).parameters.values())
    shown = [p.name for p in documented.params]
    actual = [p.name for p in real]
    if shown != actual:
        problems.append(f"{where}: the signature block shows the parameters {shown}, the real "
                        f"ones are {actual}")
        return problems
    for doc, param in zip(documented.params, real, strict=True):
        if doc.kind != param.kind:
            problems.append(f"{where}: parameter {param.name!r} is {param.kind.description}, "
                            f"the signature block shows it {doc.kind.description}")
        if doc.default is None:
            if param.default is not inspect.Parameter.empty and doc.kind not in (
                    inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                problems.append(f"{where}: parameter {param.name!r} has the default "
                                f"{param.default!r}, the signature block shows none")
        elif (problem := _default_problem(where, param.name, doc.default, param.default)):
            problems.append(problem)
    return problems


def parameter_list_problems(where: str, documented: list[str] | None, obj: Any,
                            owner: type | None, label: str = "Parameters") -> list[str]:
    real = [p.name for p in _real_signature(obj, owner).parameters.values()]
    if documented is None:
        if real:
            return [f"{where}: no '{label}:' list; undocumented parameters: {real}"]
        return []
    shown = [name.lstrip("*") for name in documented]
    problems = [f"{where}: parameter {name!r} is not documented in its {label} list"
                for name in real if name not in shown]
    problems += [f"{where}: documented parameter {name!r} does not exist in the code"
                 for name in shown if name not in real]
    if not problems and shown != real:
        problems.append(f"{where}: the {label} list is in the order {shown}, the signature's "
                        f"is {real}")
    return problems


def _named_list_problems(where: str, what: str, documented: list[str] | None,
                         real: list[str]) -> list[str]:
    if documented is None:
        return [f"{where}: no list of its {what} ({real})"]
    problems = [f"{where}: {what[:-1]} {name!r} is not documented"
                for name in real if name not in documented]
    problems += [f"{where}: documented {what[:-1]} {name!r} does not exist in the code"
                 for name in documented if name not in real]
    if not problems and documented != real:
        problems.append(f"{where}: {what} documented in the order {documented}, the code's "
                        f"is {real}")
    return problems


def _exception_named(name: str, module: Any, exceptions: Any) -> type | None:
    obj = getattr(module, name, None)
    if obj is None and name not in getattr(module, "__all__", ()):
        obj = getattr(exceptions, name, None) or getattr(builtins, name, None)
    return obj if _is_exception(obj) else None


def tree_problems(trees: list[str], module: Any, exceptions: Any) -> list[str]:
    """The exception tree of the Exceptions section against the real classes."""
    base_error = exceptions.GestvenvError
    if len(trees) != 1:
        return [f"the Exceptions section must hold one text block, the tree ({len(trees)} found)"]
    problems: list[str] = []
    stack: list[tuple[int, str]] = []   # (column, name) of the current branch
    seen: set[str] = set()
    for line in trees[0].splitlines():
        match = re.search(r"[A-Za-z_]\w*", line)
        if match is None:
            continue
        name, column = match.group(0), match.start()
        cls = _exception_named(name, module, exceptions)
        if cls is None:
            problems.append(f"exception tree: {name!r} is not an exception of gestvenv")
            continue
        seen.add(name)
        while stack and stack[-1][0] >= column:
            stack.pop()
        real_parent = next((b.__name__ for b in cls.__bases__ if issubclass(b, base_error)),
                           None)
        shown_parent = stack[-1][1] if stack else None
        if shown_parent != real_parent:
            problems.append(f"exception tree: {name} is shown under {shown_parent}, its "
                            f"base class is {real_parent}")
        stack.append((column, name))
    expected = {n for n in module.__all__ if _is_exception(getattr(module, n, None))}
    expected |= {n for n, obj in vars(exceptions).items()
                 if _is_exception(obj) and issubclass(obj, base_error)
                 and obj.__module__ == exceptions.__name__}
    problems += [f"exception tree: {name} is missing" for name in sorted(expected - seen)]
    return problems


# --- the checker ---

def check_reference(text: str, module: Any = gestvenv,
                    exceptions: Any = gestvenv.exceptions) -> list[str]:
    """Every way the reference ``text`` differs from ``module`` (its ``__all__`` and the
    objects behind it). Empty: they agree."""
    reference = parse_reference(text)
    problems = list(reference.problems)
    public = list(module.__all__)
    tops = [s for s in reference.sections if s.level == 3]
    members = [s for s in reference.sections if s.level == 4]

    counts: dict[str, int] = {}
    for section in reference.sections:
        counts[section.name] = counts.get(section.name, 0) + 1
    problems += [f"{name} is documented {n} times" for name, n in counts.items() if n > 1]

    documented = {s.name for s in tops}
    problems += [f"{name} is in gestvenv.__all__ but has no '### `{name}`' heading"
                 for name in public if name not in documented]
    problems += [f"line {s.line}: '### `{s.name}`' documents a name that is not in "
                 f"gestvenv.__all__" for s in tops if s.name not in public]

    # Every public method and property of every public class has its #### heading.
    documented_members = {s.name for s in members}
    for name in public:
        obj = getattr(module, name, None)
        if not inspect.isclass(obj):
            continue
        for member in public_members(obj):
            if f"{name}.{member}" not in documented_members:
                problems.append(f"{name}.{member} exists in the code but has no "
                                f"'#### `{name}.{member}`' heading")

    for section in reference.sections:
        problems += _section_problems(section, module, exceptions, public)
    problems += tree_problems(reference.trees, module, exceptions)
    return problems


def _section_problems(section: Section, module: Any, exceptions: Any,
                      public: list[str]) -> list[str]:
    where = f"{section.name} (line {section.line})"
    problems: list[str] = []
    for name in section.raises:
        if _exception_named(name, module, exceptions) is None:
            problems.append(f"{where}: its Raises list names {name!r}, which is not an "
                            "exception of gestvenv or a builtin one")
    if section.level == 4:
        return problems + _member_problems(section, where, module, public)
    if section.name not in public:
        return problems
    obj = getattr(module, section.name)
    if len(section.signatures) > 1:
        problems.append(f"{where}: {len(section.signatures)} signature blocks, one at most")
    if not callable(obj):
        if section.signatures:
            problems.append(f"{where}: a signature block for something that is not callable")
        return problems
    if not inspect.isclass(obj):
        if not section.signatures:
            return [*problems, f"{where}: no 'python norun=signature' block"]
        problems += signature_problems(where, section.signatures[0], obj, None, section.name)
        problems += parameter_list_problems(where, section.lists.get("Parameters"), obj, None)
        return problems
    if section.signatures:
        problems += signature_problems(where, section.signatures[0], obj, None, section.name)
        params = section.lists.get("Parameters", section.lists.get("Fields"))
        problems += parameter_list_problems(where, params, obj, None)
    if dataclasses.is_dataclass(obj):
        fields = section.lists.get("Fields", section.lists.get("Attributes"))
        problems += _named_list_problems(where, "fields", fields,
                                         [f.name for f in dataclasses.fields(obj)])
    elif "Attributes" in section.lists:
        source = inspect.getsource(obj)
        problems += [f"{where}: documented attribute {name!r} is not set by the class"
                     for name in section.lists["Attributes"]
                     if f"self.{name} =" not in source and not hasattr(obj, name)]
    if issubclass(obj, enum.Enum):
        problems += _named_list_problems(where, "members", section.lists.get("Members"),
                                         list(obj.__members__))
    if _is_exception(obj):
        real = [b.__name__ for b in obj.__bases__]
        if section.bases is None:
            problems.append(f"{where}: no 'Base class: `...`' line (it is {real})")
        elif section.bases != real:
            problems.append(f"{where}: documented base classes {section.bases}, the real "
                            f"ones are {real}")
    return problems


def _member_problems(section: Section, where: str, module: Any,
                     public: list[str]) -> list[str]:
    owner_name, _, member = section.name.partition(".")
    if not member or "." in member:
        return [f"{where}: a member heading must be '#### `Class.member`'"]
    if owner_name != section.parent:
        return [f"{where}: a member of {owner_name} under the heading of {section.parent}"]
    owner = getattr(module, owner_name, None) if owner_name in public else None
    if not inspect.isclass(owner):
        return [f"{where}: {owner_name} is not a public class"]
    members = public_members(owner)
    if member not in members:
        return [f"{where}: documented member {section.name} does not exist in the code"]
    obj = members[member]
    if isinstance(obj, property):
        if section.signatures:
            return [f"{where}: a signature block for a property"]
        return []
    if len(section.signatures) != 1:
        return [f"{where}: one 'python norun=signature' block needed, "
                f"{len(section.signatures)} found"]
    return [*signature_problems(where, section.signatures[0], obj, owner, member),
            *parameter_list_problems(where, section.lists.get("Parameters"), obj, owner)]


# --- the tests ---

@pytest.fixture(scope="module")
def reference_text() -> str:
    return DOC.read_text()


def test_the_reference_matches_the_code(reference_text: str) -> None:
    problems = check_reference(reference_text)
    assert not problems, "docs/api/ephemeral.md and the code differ:\n" + "\n".join(problems)


def test_the_reference_is_parsed_as_intended(reference_text: str) -> None:
    """The parser sees what the checks rely on (a change of format must not silence them)."""
    reference = parse_reference(reference_text)
    sections = {s.name: s for s in reference.sections}
    execute = sections["Environment.execute"]
    assert execute.parent == "Environment"
    assert parse_signature(execute.signatures[0]).kind == "async def"
    assert execute.lists["Parameters"][:2] == ["cmd", "timeout"]
    assert "CommandError" in execute.raises
    assert sections["ValidationError"].bases == ["GestvenvError", "ValueError"]
    assert sections["IsolationLevel"].lists["Members"] == ["PROCESS", "NAMESPACE", "CONTAINER",
                                                           "CHROOT"]
    assert len(reference.trees) == 1


def _module(names: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Any:
    """gestvenv as the checker sees it, with names added, replaced or removed."""
    contents = {name: getattr(gestvenv, name) for name in gestvenv.__all__ if name not in drop}
    contents.update(names or {})
    return types.SimpleNamespace(__all__=sorted(contents), **contents)


def _mentioning(problems: list[str], *words: str) -> list[str]:
    return [p for p in problems if all(word in p for word in words)]


def test_an_undocumented_public_name_is_reported(reference_text: str) -> None:
    def snapshot(env: object, *, keep: bool = False) -> None:
        """A public function added without its documentation."""

    problems = check_reference(reference_text, _module({"snapshot": snapshot}))
    assert _mentioning(problems, "snapshot", "no '### `snapshot`' heading"), problems


def test_a_heading_for_a_name_outside_all_is_reported(reference_text: str) -> None:
    problems = check_reference(reference_text, _module(drop=("global_stats",)))
    assert _mentioning(problems, "global_stats", "not in gestvenv.__all__"), problems
    text = reference_text + "\n### `Sampler`\n\nNot public.\n"
    assert _mentioning(check_reference(text), "Sampler", "not in gestvenv.__all__")


def test_a_renamed_or_added_parameter_is_reported(reference_text: str) -> None:
    def attach(name: str, *, config: object = None, timeout: float | None = None) -> None:
        """attach() with a parameter more."""

    problems = check_reference(reference_text, _module({"attach": attach}))
    assert _mentioning(problems, "attach", "'timeout' is not documented"), problems

    def load_config(env_vars: object = None) -> None:
        """load_config() with its parameter renamed."""

    problems = check_reference(reference_text, _module({"load_config": load_config}))
    assert _mentioning(problems, "load_config", "'env_vars' is not documented"), problems
    assert _mentioning(problems, "load_config", "'environ' does not exist"), problems


def test_a_changed_method_is_reported(reference_text: str) -> None:
    class Environment(gestvenv.Environment):
        async def execute(self, cmd: object, *, deadline: float | None = None) -> None:
            """execute() whose timeout became a deadline."""

        def snapshot(self) -> None:
            """A public method added without its documentation."""

    problems = check_reference(reference_text, _module({"Environment": Environment}))
    assert _mentioning(problems, "Environment.execute", "'deadline'"), problems
    assert _mentioning(problems, "Environment.snapshot", "no '#### `Environment.snapshot`'")


def test_a_missing_or_phantom_member_heading_is_reported(reference_text: str) -> None:
    assert "#### `Environment.watch`" in reference_text
    without = reference_text.replace("#### `Environment.watch`", "Environment.watch")
    assert _mentioning(check_reference(without), "Environment.watch", "has no")
    phantom = reference_text.replace("#### `Environment.watch`", "#### `Environment.peek`")
    assert _mentioning(check_reference(phantom), "Environment.peek", "does not exist")


def test_an_undocumented_parameter_bullet_is_reported(reference_text: str) -> None:
    bullet = "- `idle_timeout`: seconds without a running command"
    assert reference_text.count(bullet) == 1
    problems = check_reference(reference_text.replace(bullet, "- seconds without a command"))
    assert _mentioning(problems, "ephemeral", "'idle_timeout' is not documented"), problems


def test_a_wrong_default_is_reported(reference_text: str) -> None:
    shown = "async def watch(interval=1.0)"
    assert shown in reference_text
    problems = check_reference(reference_text.replace(shown, "async def watch(interval=5)"))
    assert _mentioning(problems, "Environment.watch", "interval", "1.0"), problems


def test_a_wrong_base_class_is_reported(reference_text: str) -> None:
    class ConfigError(gestvenv.ValidationError):
        """ConfigError moved under ValidationError."""

    problems = check_reference(reference_text, _module({"ConfigError": ConfigError}))
    assert _mentioning(problems, "ConfigError", "base class"), problems
    assert _mentioning(problems, "exception tree", "ConfigError"), problems


def test_a_new_dataclass_field_is_reported(reference_text: str) -> None:
    @dataclasses.dataclass(frozen=True)
    class LimitStatus(gestvenv.LimitStatus):
        since: float = 0.0

    problems = check_reference(reference_text, _module({"LimitStatus": LimitStatus}))
    assert _mentioning(problems, "LimitStatus", "'since' is not documented"), problems


@pytest.mark.parametrize(("code", "expected"), [
    ("def f(a, /, b, *, c=1) -> int", [("a", "POSITIONAL_ONLY", None),
                                       ("b", "POSITIONAL_OR_KEYWORD", None),
                                       ("c", "KEYWORD_ONLY", "1")]),
    ("async def g(*args, key=(1, 2), **kw)", [("args", "VAR_POSITIONAL", None),
                                             ("key", "KEYWORD_ONLY", "(1, 2)"),
                                             ("kw", "VAR_KEYWORD", None)]),
    ("class C(x='a,b', y={'k': [1, 2]})", [("x", "POSITIONAL_OR_KEYWORD", "'a,b'"),
                                            ("y", "POSITIONAL_OR_KEYWORD", "{'k': [1, 2]}")]),
])
def test_signature_blocks_are_read_like_python(code: str,
                                               expected: list[tuple[str, str, str | None]]
                                               ) -> None:
    parsed = parse_signature(code)
    assert [(p.name, p.kind.name, p.default) for p in parsed.params] == expected


def test_the_checker_needs_the_parts_it_checks() -> None:
    """A reference reduced to its headings: each missing part is reported, by name."""
    text = "\n\n".join(f"### `{name}`" for name in gestvenv.__all__)
    problems = check_reference(text)
    checks: list[Callable[[], list[str]]] = [
        lambda: _mentioning(problems, "ephemeral", "no 'python norun=signature' block"),
        lambda: _mentioning(problems, "ResourceLimits", "no list of its fields"),
        lambda: _mentioning(problems, "IsolationLevel", "no list of its members"),
        lambda: _mentioning(problems, "InvalidNameError", "no 'Base class"),
        lambda: _mentioning(problems, "Environment.execute", "has no"),
        lambda: _mentioning(problems, "one text block, the tree"),
    ]
    for check in checks:
        assert check(), problems
