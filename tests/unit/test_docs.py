"""Man pages generated from the click tree: complete, clean roff, reproducible."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from gestvenv.cli import cli, docs
from gestvenv.config import OPTIONS, Config, system_config_path, user_config_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return docs.man_pages(date="")


def page_of(node: docs.Node) -> str:
    """The page that documents ``node``: its top-level command's, or gestvenv(1)."""
    return f"{'-'.join(node.path[:2])}.1"


def chunk(page: str, node: docs.Node) -> str:
    """The part of a page about ``node``: its own subsection, or the page before COMMANDS (the
    whole of gestvenv(1), whose COMMANDS are one line each)."""
    if len(node.path) == 1:
        return page
    if len(node.path) == 2:
        return page.partition("\n.SH COMMANDS\n")[0]
    start = page.index(f'\n.SS "{docs.roff(node.name)}"\n')
    following = re.search(r"\n\.S[SH] ", page[start + 1:])
    return page[start:start + 1 + following.start()] if following else page[start:]


def test_one_page_per_top_level_command(pages: dict[str, str]) -> None:
    assert set(pages) == {"gestvenv.1", *(f"gestvenv-{name}.1" for name in cli.commands)}
    assert {"gestvenv-ephemeral.1", "gestvenv-run.1", "gestvenv-config.1"} <= set(pages)


def test_every_command_option_and_argument_is_documented(pages: dict[str, str]) -> None:
    """Walks the real tree: a new command or option without its documentation fails here."""
    nodes = list(docs.walk())
    names = {n.name for n in nodes}
    assert {"gestvenv ephemeral create", "gestvenv ephemeral timer install",
            "gestvenv ephemeral timer uninstall", "gestvenv ephemeral timer status",
            "gestvenv run", "gestvenv config set"} <= names
    for node in nodes:
        text = chunk(pages[page_of(node)], node)
        assert docs.usage(node) in text, node.name
        if node.command.help:
            assert docs.render_help(node.command.help)[0] in text, node.name
        for param in node.command.get_params(node.ctx):
            if isinstance(param, click.Argument):
                assert f"\n.TP\n{docs.param_tag(param)}\n" in text, (node.name, param.name)
                continue
            if param.opts == ["--help"] or "-h" in param.opts:
                assert r"\fB\-\-help\fR" in pages[page_of(node)]
                continue
            for opt in (*param.opts, *param.secondary_opts):
                assert docs.bold(opt) in text, (node.name, opt)
            if help_text := getattr(param, "help", None):
                first_words = " ".join(help_text.split()[:3])
                assert docs.inline(first_words) in text, (node.name, param.opts)


def test_no_parameter_goes_undescribed(pages: dict[str, str]) -> None:
    """An option without help, choices or type to say gets a placeholder: none may."""
    for name, page in pages.items():
        assert "(No description.)" not in page, name


def test_option_details_are_spelled_out(pages: dict[str, str]) -> None:
    page = pages["gestvenv-ephemeral.1"]
    create = chunk(page, next(n for n in docs.walk() if n.name == "gestvenv ephemeral create"))
    assert r"\fB\-\-runtime\fR \fIauto\fR|\fIsystemd\fR|\fIlocal\fR" in create  # choices
    assert r"\fB\-p\fR, \fB\-\-packages\fR \fISPECS\fR" in create  # metavar
    assert r"\fB\-\-cpu\fR \fIFLOAT\fR" in create and "A number > 0." in create  # range
    assert r"\fB\-\-user\fR / \fB\-\-system\fR" in page  # a boolean pair
    run = next(n for n in docs.walk() if n.name == "gestvenv run")
    assert "Required." in chunk(pages["gestvenv-run.1"], run)
    show = chunk(page, next(n for n in docs.walk() if n.name == "gestvenv ephemeral show"))
    assert "The shell completes it with the names of your environments." in show


def test_a_default_and_an_environment_variable_are_shown() -> None:
    command = click.Command("x", params=[
        click.Option(["--level"], default=3, envvar="X_LEVEL", help="How much."),
        click.Option(["--flag"], is_flag=True, help="A flag.")])
    lines = "\n".join(docs.render_params(command.params))
    assert r"How much. Default: \fB3\fR. Environment variable: \fBX_LEVEL\fR." in lines
    assert "Default" not in lines.partition("--flag")[2]


def test_every_config_key_with_its_default(pages: dict[str, str]) -> None:
    page = pages["gestvenv.1"]
    configuration = page.partition("\n.SH CONFIGURATION\n")[2].partition("\n.SH ")[0]
    defaults = Config().as_dict()
    for key in OPTIONS:
        tag = f"{docs.bold(key)} (\\fB{docs.roff('GESTVENV_EPHEMERAL_' + key.upper())}\\fR)"
        assert f".TP\n{tag}\n" in configuration, key
    body = configuration.partition(docs.bold("default_ttl"))[2].partition(".TP")[0]
    assert f"Default: \\fB{defaults['default_ttl']}\\fR." in body
    assert r"Default: \fB\(dqdisk\(dq\fR." in configuration  # an enum, as TOML
    assert "Precedence, lowest first: defaults < " in configuration


def test_config_files_are_named_as_the_code_finds_them(pages: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GESTVENV_SYSTEM_CONFIG", raising=False)
    monkeypatch.delenv("GESTVENV_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "$XDG_CONFIG_HOME")
    page = pages["gestvenv.1"]
    assert docs.bold(str(system_config_path())) in page
    assert docs.bold(str(user_config_path())) in page


def test_config_example_is_valid() -> None:
    table = tomllib.loads(docs.CONFIG_EXAMPLE)["ephemeral"]
    assert Config().replace(_source="example", **table).default_ttl == table["default_ttl"]


def test_environment_lists_every_variable_the_code_reads() -> None:
    listed = {name for names, _ in docs.ENVIRONMENT for name in names.split(", ")}
    read = set()
    for path in (ROOT / "gestvenv").rglob("*.py"):
        if path.name != "docs.py":
            read |= set(re.findall(r"os\.environ\.get\(\s*\"([A-Z_]+)\"", path.read_text()))
    assert read, "found no variable: the pattern is stale"
    assert read <= listed, read - listed
    source = "\n".join(p.read_text() for p in (ROOT / "gestvenv").rglob("*.py")
                       if p.name != "docs.py")
    for name in listed - {"GESTVENV_EPHEMERAL_<KEY>", "UV_*"}:
        assert name in source, f"{name} is documented but never read"


def test_files_come_from_the_storage_layout(pages: dict[str, str]) -> None:
    rows = docs.storage_layout()
    assert len(rows) >= 5, "storage.py's layout table was not parsed"
    assert ("/run/gestvenv", "$XDG_RUNTIME_DIR/gestvenv") in [(r[0], r[1]) for r in rows]
    files = pages["gestvenv.1"].partition("\n.SH FILES\n")[2].partition("\n.SH ")[0]
    for as_root, as_user, _ in rows:
        assert docs.italic(as_root) in files and docs.italic(as_user) in files
    for name in ("gestvenv-cleanup.timer", "gestvenv.slice", "/usr/lib/tmpfiles.d/gestvenv.conf"):
        assert docs.italic(name) in files


def test_exit_statuses_are_those_of_the_code(pages: dict[str, str]) -> None:
    statuses = docs.exit_statuses()
    assert {0, 1, 2, 126, 127, 130, 143} <= set(statuses)
    for page in pages.values():
        section = page.partition("\n.SH EXIT STATUS\n")[2].partition("\n.SH ")[0]
        for code in statuses:
            assert f".TP\n\\fB{code}\\fR\n" in section


def _resolve(argv: list[str]) -> click.Context:
    """Parse ``argv`` as gestvenv would, without invoking anything: UsageError if wrong."""
    command: click.Command = cli
    ctx = command.make_context("gestvenv", argv)
    while isinstance(command, click.Group):
        protected = ctx.__dict__.get("_protected_args", ctx.__dict__.get("protected_args", []))
        name, sub, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        assert name is not None and sub is not None
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return ctx


def test_examples_use_real_commands_and_options() -> None:
    lines = [line for items in docs.EXAMPLES.values() for _, text in items
             for line in text.splitlines()]
    assert len(lines) >= 8
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "gestvenv"
        _resolve(argv[1:])  # raises on an unknown command or option, or a bad value
    with pytest.raises(click.UsageError):
        _resolve(["ephemeral", "create", "--no-such-option"])


# --- roff ------------------------------------------------------------------------------------

def test_roff_escapes() -> None:
    assert docs.roff(r"a\b") == r"a\(rsb"
    assert docs.roff("--x -y") == r"\-\-x \-y"
    assert docs.roff("it's `x` \"q\"") == r"it\(aqs \(gax\(ga \(dqq\(dq"
    assert docs.roff("é—→") == r"\[u00E9]\[u2014]\[u2192]"
    assert docs.roff("a\bb\x1bc\td") == "abc d"
    assert docs.text_line(docs.roff(".SH x")) == r"\&.SH x"
    assert docs.text_line(docs.roff("'x")).startswith(r"\(aq")
    assert docs.inline("run `gestvenv show` now") == r"run \fBgestvenv\~show\fR now"


TRICKY = """First line with a \\backslash, it's "quoted" -- and café → done.

.SH not a request
'neither this

\b
verbatim:   keep   these   spaces
  .indented dot

after the block
\f
:param private: not help
"""


@pytest.fixture
def tricky_page() -> str:
    command = click.Command("tricky", help=TRICKY, params=[
        click.Option(["--odd"], help=".dot first, back\\slash, 'quote'")])
    ctx = click.Context(command, info_name="tricky", help_option_names=["-h", "--help"])
    return docs.command_page(docs.Node(("gestvenv", "tricky"), command, ctx), "")


def test_tricky_help_text(tricky_page: str) -> None:
    lines = tricky_page.splitlines()
    requests = {line.split()[0] for line in lines if line.startswith((".", "'"))}
    assert requests <= {".\\\"", ".TH", ".SH", ".SS", ".PP", ".TP", ".IP", ".RS", ".RE", ".nf",
                        ".fi", ".nh", ".ad", ".sp"}, requests
    assert r"\&.SH not a request \(aqneither this" in lines
    assert "private" not in tricky_page
    assert "\b" not in tricky_page and "\f" not in tricky_page
    assert all(ord(c) < 128 for c in tricky_page)
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    text = render(tricky_page)
    assert "First line with a \\backslash, it's \"quoted\" -- and café → done." in \
        " ".join(text.split())
    assert "verbatim:   keep   these   spaces" in text
    assert "  .indented dot" in text
    assert ".SH not a request" in text and "'neither this" in text
    assert ".dot first, back\\slash, 'quote'" in text


def render(page: str, width: int = 80) -> str:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", f"-rLL={width}n", "-ww"],
                          input=page.encode(), capture_output=True, check=True)
    assert proc.stderr == b"", proc.stderr.decode()
    return proc.stdout.decode()


needs_man = pytest.mark.skipif(shutil.which("man") is None or shutil.which("groff") is None,
                               reason="man and groff are not installed")


@needs_man
def test_pages_render_without_warnings(tmp_path: Path, pages: dict[str, str],
                                       tricky_page: str) -> None:
    """What lintian runs (its warnings become tags), and groff with every warning on."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80"}
    for name, page in {**pages, "tricky.1": tricky_page}.items():
        path = tmp_path / name
        path.write_text(page, encoding="ascii")
        man = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                              str(path)], env=env, capture_output=True, text=True, check=True)
        assert man.stderr == "", (name, man.stderr)
        groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                               capture_output=True, text=True, check=True)
        assert groff.stderr == "", (name, groff.stderr)
        shown = subprocess.run(["man", "-l", str(path)], env=env, capture_output=True,
                               text=True, check=True).stdout
        too_long = [line for line in shown.splitlines() if len(line) > 80]
        assert not too_long, (name, too_long)


@needs_man
def test_man_finds_subcommand_pages(tmp_path: Path, pages: dict[str, str]) -> None:
    """``man gestvenv run`` opens gestvenv-run(1); whatis entries parse."""
    (tmp_path / "man1").mkdir()
    for name, page in pages.items():
        (tmp_path / "man1" / name).write_text(page)
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"}
    shown = subprocess.run(["man", "-M", str(tmp_path), "gestvenv", "run"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert shown.splitlines()[0].startswith("GESTVENV-RUN(1)")
    if shutil.which("lexgrog"):
        whatis = subprocess.run(["lexgrog", *map(str, (tmp_path / "man1").iterdir())],
                                capture_output=True, text=True, check=True).stdout
        assert '"gestvenv-ephemeral - create, inspect and destroy' in whatis


# --- reproducibility and the command ---------------------------------------------------------

def test_renders_are_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = docs.man_pages()
    assert first == docs.man_pages()
    assert '.TH GESTVENV 1 "" "gestvenv 0.1.0" "gestvenv manual"' in first["gestvenv.1"]
    assert docs.completion_scripts() == docs.completion_scripts()


def test_source_date_epoch_is_the_date(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pages = docs.man_pages()
    assert r'.TH GESTVENV 1 "2023\-11\-14" "gestvenv 0.1.0"' in pages["gestvenv.1"]
    assert r'.TH GESTVENV\-RUN 1 "2023\-11\-14"' in pages["gestvenv-run.1"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH"):
        docs.man_pages()


def test_out_writes_every_file(tmp_path: Path) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "gestvenv.cli.docs", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          check=True)
    written = [Path(line) for line in proc.stdout.splitlines()]
    expected = {tmp_path / "out" / "man" / name for name in docs.man_pages(date="")}
    expected |= {tmp_path / "out" / "completions" / n
                 for n in ("gestvenv.bash", "_gestvenv", "gestvenv.fish")}
    assert set(written) == expected and len(written) == len(expected)
    assert proc.stderr == ""
    man = (tmp_path / "out" / "man" / "gestvenv-ephemeral.1").read_text()
    assert r'"2023\-11\-14"' in man
    assert "_GESTVENV_COMPLETE=bash_complete" in (tmp_path / "out" / "completions" /
                                                  "gestvenv.bash").read_text()


def test_bad_source_date_epoch_fails_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "-1")
    assert docs.main(["--out", str(tmp_path)]) == 1
    assert "SOURCE_DATE_EPOCH" in capsys.readouterr().err
