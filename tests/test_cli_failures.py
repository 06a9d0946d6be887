"""How kbms fails: one line on stderr naming the database and the next step, the documented exit code, no
traceback (unless asked for with --debug), and no file left behind.

Each failure is checked through the CLI runner and in a real process (``python -m kbms``): only a process shows
what a user sees, a traceback included.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import make_url
from typer.main import get_command
from typer.testing import CliRunner

from kbms import __version__
from kbms.cli import app
from kbms.cli.exits import DATABASE, REJECTED, USAGE
from tests.conftest import free_port, require_postgres
from tests.faults import HOLD_SQLITE_WRITE_LOCK, held_by_another_process
from tests.helpers import intercom_payload, zendesk_pushes

runner = CliRunner()
PASSWORD = "s3cret-pw"  # must never be printed


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's commands read KBMS_* variables: only the ones a test sets count."""
    for name in os.environ:
        if name.startswith("KBMS_") and name != "KBMS_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) through the CLI runner."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    assert not isinstance(result.exception, AssertionError | TypeError | AttributeError), result.exception
    return result.exit_code, result.stdout, result.stderr


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``kbms args`` in a process of its own, with no KBMS_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KBMS_")}
    return subprocess.run(
        [sys.executable, "-m", "kbms", *args],
        cwd=cwd,
        env={**clean, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(stderr: str) -> str:
    """The one line a failure prints: nothing else on stderr, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("kbms: "), lines[0]
    return lines[0]


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


def ndjson(path: Path, payloads: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(payload) + "\n" for payload in payloads))
    return path


COMMANDS = {
    "ingest": ("ingest", "in.ndjson"),
    "export": ("export", "--out", "out.ndjson"),
    "reprocess": ("reprocess",),
    "serve": ("serve",),
}


def test_version() -> None:
    assert invoke("--version")[:2] == (0, f"kbms {__version__}\n")


def test_version_in_a_process(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"kbms {__version__}\n", "")


def _commands() -> Iterator[list[str]]:
    def walk(command: object, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    yield from walk(get_command(app), [])


@pytest.mark.parametrize("path", list(_commands()), ids=lambda path: " ".join(path) or "kbms")
def test_help_shows_readable_placeholders(path: list[str]) -> None:
    code, output, _ = invoke(*path, "--help")
    assert code == 0
    assert "--help" in output
    for placeholder in ("<bool>", "<str>", "<int>", "<datetime>", "<path>", " TEXT ", " INTEGER "):
        assert placeholder not in output, f"kbms {' '.join(path)} --help shows {placeholder}:\n{output}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_database_file_is_one_line_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Started in a directory without a database (the default URL, data/kbms.db): nothing is created there."""
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    monkeypatch.chdir(tmp_path)
    code, _, stderr = invoke(*COMMANDS[command])
    assert code == USAGE
    assert one_line(stderr) == f"kbms: no database at {tmp_path / 'data' / 'kbms.db'}: run kbms migrate first"
    assert files_under(tmp_path) == {"in.ndjson"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_database_file_in_a_process(tmp_path: Path, command: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'kbms.db'}"
    result = run(*COMMANDS[command], "--database-url", url, cwd=tmp_path)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    assert (
        line
        == f"kbms: no database at {tmp_path / 'elsewhere' / 'kbms.db'}: run kbms migrate --database-url {url} first"
    )
    assert files_under(tmp_path) == {"in.ndjson"}


def test_migrate_creates_the_database_and_names_it(tmp_path: Path) -> None:
    result = run("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sqlite:///data/kbms.db migrated from empty to" in result.stdout
    assert (tmp_path / "data" / "kbms.db").is_file()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_database_not_migrated_names_it_and_the_command_to_run(
    tmp_path: Path, empty_database_url: str, command: str
) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    if make_url(empty_database_url).get_backend_name() == "sqlite":
        Path(make_url(empty_database_url).database or "").touch()  # a file, but no schema in it
    before = files_under(tmp_path)
    result = run(*COMMANDS[command], "--database-url", empty_database_url, cwd=tmp_path)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    shown = make_url(empty_database_url).render_as_string(hide_password=True)
    assert f"the database {shown} is not migrated (its schema is at empty" in line
    assert line.endswith(f": run kbms migrate --database-url {shown}")
    assert files_under(tmp_path) == before


def test_a_database_not_migrated_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "kbms.db").touch()  # a file, but no schema in it
    url = f"sqlite:///{tmp_path / 'kbms.db'}"
    code, _, stderr = invoke("export", "--out", str(tmp_path / "out"), env={"KBMS_DATABASE_URL": url})
    assert code == USAGE
    assert one_line(stderr).endswith(": run kbms migrate")


def closed_port_url() -> str:
    return f"postgresql://kbms:{PASSWORD}@127.0.0.1:{free_port()}/kbms"


@pytest.mark.parametrize("command", ["migrate", *COMMANDS])
def test_postgresql_unreachable_is_exit_3_in_one_line(tmp_path: Path, command: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    url = closed_port_url()
    args = (command,) if command == "migrate" else COMMANDS[command]
    result = run(*args, "--database-url", url, cwd=tmp_path)
    assert result.returncode == DATABASE
    line = one_line(result.stderr)
    shown = url.replace(PASSWORD, "***")
    assert line == (
        f"kbms: cannot reach the database {shown} (connection refused): start PostgreSQL or fix "
        "KBMS_DATABASE_URL / --database-url"
    )
    assert PASSWORD not in result.stdout + result.stderr
    assert files_under(tmp_path) == {"in.ndjson"}


def test_a_password_in_the_query_is_hidden_too() -> None:
    port = free_port()
    url = f"postgresql://kbms@127.0.0.1:{port}/kbms?password={PASSWORD}&application_name=x"
    code, _, stderr = invoke("export", "--out", "out.ndjson", "--database-url", url)
    assert code == DATABASE
    assert f"127.0.0.1:{port}/kbms?application_name=x&password=*** (connection refused)" in one_line(stderr)
    assert PASSWORD not in stderr


def test_postgresql_unreachable_through_the_runner() -> None:
    code, _, stderr = invoke("migrate", env={"KBMS_DATABASE_URL": closed_port_url()})
    assert code == DATABASE
    assert "(connection refused)" in one_line(stderr)
    assert PASSWORD not in stderr


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("part", "value", "reason"),
    [
        ("database", "kbms_no_such_database", 'database "kbms_no_such_database" does not exist'),
        ("username", "kbms_no_such_role", 'role "kbms_no_such_role" does not exist'),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "export"])
def test_postgresql_refusing_the_database_or_the_user(
    tmp_path: Path, part: str, value: str, reason: str, command: str
) -> None:
    server = make_url(require_postgres())
    url = (server.set(database=value) if part == "database" else server.set(username=value)).render_as_string(
        hide_password=False
    )
    args = ("migrate",) if command == "migrate" else ("export", "--out", "out.ndjson")
    result = run(*args, "--database-url", url, cwd=tmp_path)
    assert result.returncode == DATABASE
    assert f"({reason})" in one_line(result.stderr)
    assert files_under(tmp_path) == set()
    code, _, stderr = invoke(*args, "--database-url", url)
    assert (code, one_line(stderr)) == (DATABASE, one_line(result.stderr))


@pytest.mark.parametrize(
    ("args", "env"), [(("--debug", "migrate"), {}), (("migrate",), {"KBMS_LOG_LEVEL": "debug"})], ids=["flag", "env"]
)
def test_debug_prints_the_traceback_after_the_line(tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    result = run(*args, "--database-url", closed_port_url(), cwd=tmp_path, env=env)
    assert result.returncode == DATABASE
    first, rest = result.stderr.split("\n", 1)
    assert first.startswith("kbms: cannot reach the database")
    assert "Traceback (most recent call last)" in rest
    assert "psycopg.OperationalError" in rest
    assert PASSWORD not in result.stderr


def test_export_reads_while_another_process_holds_the_write_lock(tmp_path: Path, sqlite_url: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a"), intercom_payload("b")])
    assert invoke("ingest", str(tmp_path / "in.ndjson"), "--database-url", sqlite_url)[0] == 0
    with held_by_another_process(HOLD_SQLITE_WRITE_LOCK, Path(make_url(sqlite_url).database or "")):
        result = run("export", "--out", "out.ndjson", "--database-url", sqlite_url, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (0, "")
        assert len((tmp_path / "out.ndjson").read_text().splitlines()) == 2
        code, stdout, _ = invoke("export", "--out", str(tmp_path / "again.ndjson"), "--database-url", sqlite_url)
        assert (code, "Exported 2 conversations" in stdout) == (0, True)


def test_ingest_while_another_process_holds_the_write_lock_is_exit_3(tmp_path: Path, sqlite_url: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    with held_by_another_process(HOLD_SQLITE_WRITE_LOCK, Path(make_url(sqlite_url).database or "")):
        result = run("ingest", "in.ndjson", "--database-url", sqlite_url, cwd=tmp_path, env={"KBMS_DB_TIMEOUT": "0.5"})
    assert result.returncode == DATABASE
    line = one_line(result.stderr)
    assert line.startswith(f"kbms: the database {sqlite_url} is locked by another process")
    assert line.endswith("then run again (KBMS_DB_TIMEOUT sets how long kbms waits for it)")


def test_a_database_path_that_is_no_file_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    url = f"sqlite:///{tmp_path / 'dir.db'}"
    result = run("export", "--out", "out.ndjson", "--database-url", url, cwd=tmp_path)
    assert result.returncode == DATABASE
    assert one_line(result.stderr).startswith(f"kbms: cannot use the database {url} (unable to open database file)")


def test_migrate_where_no_directory_can_be_made_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    url = f"sqlite:///{tmp_path / 'file' / 'kbms.db'}"
    code, _, stderr = invoke("migrate", "--database-url", url)
    assert code == DATABASE
    assert f"(cannot create the directory {tmp_path / 'file'}" in one_line(stderr)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KBMS_MAX_BODY_BYTES", "lots", "kbms: KBMS_MAX_BODY_BYTES: Input should be a valid integer"),
        ("KBMS_DATABASE_URL", f"postgresql://u:{PASSWORD}@host:port/db", "kbms: KBMS_DATABASE_URL: not a database URL"),
        ("KBMS_DATABASE_URL", "mysql://u@host/db", "kbms: KBMS_DATABASE_URL: unsupported database 'mysql'"),
    ],
)
def test_bad_configuration_is_exit_2_in_one_line(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    result = run("migrate", cwd=tmp_path, env={variable: value})
    assert result.returncode == USAGE
    assert one_line(result.stderr).startswith(expected)
    assert PASSWORD not in result.stderr
    assert files_under(tmp_path) == set()


def test_a_flag_out_of_range_names_the_flag() -> None:
    code, _, stderr = invoke("serve", "--port", "70000")
    assert code == USAGE
    assert one_line(stderr).startswith("kbms: --port: Input should be less than or equal to 65535")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_file_is_nothing_to_ingest(tmp_path: Path, database_url: str, content: str) -> None:
    path = tmp_path / "empty [bold]x[red].ndjson"  # printed as it is: no Rich markup in user input
    path.write_text(content)
    code, stdout, stderr = invoke("ingest", str(path), "--database-url", database_url)
    assert (code, stdout) == (USAGE, "")
    assert one_line(stderr) == f"kbms: {path} holds no conversations"


def test_an_empty_file_in_a_process(tmp_path: Path, sqlite_url: str) -> None:
    (tmp_path / "empty.ndjson").write_text("\n")
    result = run("ingest", "empty.ndjson", "--database-url", sqlite_url, cwd=tmp_path)
    assert result.returncode == USAGE
    assert one_line(result.stderr) == "kbms: empty.ndjson holds no conversations"


def test_reprocess_of_an_unknown_conversation_is_exit_2(tmp_path: Path, database_url: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    assert invoke("ingest", str(tmp_path / "in.ndjson"), "--database-url", database_url)[0] == 0
    unknown = "00000000-0000-0000-0000-000000000000"
    code, _, stderr = invoke("reprocess", "--conversation-id", unknown, "--database-url", database_url)
    assert code == USAGE
    assert one_line(stderr).startswith(f"kbms: no conversation '{unknown}' in ")
    result = run("reprocess", "--conversation-id", "nope", "--database-url", database_url, cwd=tmp_path)
    assert result.returncode == USAGE
    assert one_line(result.stderr).startswith("kbms: no conversation 'nope' in ")


def test_reprocess_with_nothing_in_scope_says_so_and_succeeds(tmp_path: Path, database_url: str) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    assert invoke("ingest", str(tmp_path / "in.ndjson"), "--database-url", database_url)[0] == 0
    code, _, stderr = invoke("reprocess", "--provider", "zendesk", "--database-url", database_url)
    assert code == 0
    assert one_line(stderr) == "kbms: nothing to reprocess: no stored delivery matches --provider zendesk"
    code, stdout, stderr = invoke("reprocess", "--database-url", database_url)
    assert (code, stderr) == (0, "")
    assert "kbms reprocess" in stdout


def test_a_file_of_another_provider_gets_a_hint(tmp_path: Path, database_url: str) -> None:
    path = ndjson(tmp_path / "tickets.ndjson", [body for _, body in zendesk_pushes()])
    code, stdout, stderr = invoke("ingest", str(path), "--database-url", database_url)
    assert code == REJECTED
    assert "rejected:" in stdout
    assert one_line(stderr) == (
        "kbms: every line was rejected as intercom; they validate as zendesk: run again with --provider zendesk"
    )
    code, _, stderr = invoke("ingest", str(path), "--provider", "zendesk", "--database-url", database_url)
    assert (code, stderr) == (0, "")


def test_no_hint_when_the_lines_fit_no_provider(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text('{"neither": "provider"}\n{broken\n')
    result = run("ingest", "bad.ndjson", "--database-url", sqlite_url, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (REJECTED, "")


def test_no_hint_when_some_lines_were_stored(tmp_path: Path, sqlite_url: str) -> None:
    bodies = [intercom_payload("a"), *(body for _, body in zendesk_pushes())]
    path = ndjson(tmp_path / "mixed.ndjson", bodies)
    code, _, stderr = invoke("ingest", str(path), "--database-url", sqlite_url)
    assert (code, stderr) == (REJECTED, "")


def test_the_parquet_hint_keeps_its_brackets(tmp_path: Path) -> None:
    """Without pyarrow (hidden from the process): the hint names the extra, which Rich markup would swallow."""
    program = (
        "import sys; sys.modules['pyarrow'] = None; sys.argv = ['kbms', *sys.argv[1:]]\n"
        "from kbms.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "export", "--format", "parquet", "--out", "pq"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == USAGE
    assert one_line(result.stderr) == "kbms: Parquet needs pyarrow: pip install 'kbms[parquet]'"


@contextmanager
def port_taken() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_port_in_use_is_one_line_before_startup(tmp_path: Path, sqlite_url: str, workers: str) -> None:
    with port_taken() as port:
        args = ("serve", "--port", str(port), "--workers", workers, "--database-url", sqlite_url)
        result = run(*args, cwd=tmp_path)
        assert result.returncode == USAGE
        assert one_line(result.stderr) == f"kbms: 127.0.0.1:{port} is already in use: pass --port N (or set KBMS_PORT)"
        code, _, stderr = invoke(*args)
        assert (code, one_line(stderr)) == (USAGE, one_line(result.stderr))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("no-such-host.invalid", "(unknown host): pass --host ADDRESS (or set KBMS_HOST)"),
        ("192.0.2.1", "(not an address of this machine): pass --host ADDRESS (or set KBMS_HOST)"),
    ],
)
def test_serve_on_an_address_it_cannot_listen_on(tmp_path: Path, sqlite_url: str, host: str, expected: str) -> None:
    result = run("serve", "--host", host, "--insecure", "--port", "8000", "--database-url", sqlite_url, cwd=tmp_path)
    assert result.returncode == USAGE
    assert one_line(result.stderr) == f"kbms: cannot listen on {host}:8000 {expected}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("serve", "--port", "abc"), "kbms: Invalid value for '--port': "),
        (("nope",), "kbms: No such command 'nope' (see kbms --help)"),
        (("export",), "kbms: Missing option '--out' (see kbms export --help)"),
        (("--nope",), "kbms: No such option: --nope (see kbms --help)"),
        (("ingest", "missing.ndjson"), "kbms: Invalid value for 'FILE': file 'missing.ndjson' does not exist"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == USAGE
    assert one_line(result.stderr).startswith(expected)
    code, _, stderr = invoke(*args)
    assert (code, one_line(stderr)) == (USAGE, one_line(result.stderr))


@pytest.mark.parametrize("args", [(), ("keys",)])
def test_a_group_without_its_command_shows_its_help(args: tuple[str, ...]) -> None:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert "Usage: " in result.output
    assert "Commands" in result.output


def test_reprocess_of_an_empty_ledger_says_so(database_url: str) -> None:
    code, _, stderr = invoke("reprocess", "--database-url", database_url)
    assert code == 0
    assert one_line(stderr) == "kbms: nothing to reprocess: no delivery is stored"


@pytest.mark.parametrize("command", ["migrate", "export"])
def test_a_schema_of_a_newer_kbms_is_refused_in_one_line(tmp_path: Path, sqlite_url: str, command: str) -> None:
    database = make_url(sqlite_url).database or ""
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    conn.close()
    args = ("migrate",) if command == "migrate" else ("export", "--out", "out.ndjson")
    result = run(*args, "--database-url", sqlite_url, cwd=tmp_path)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    assert f"the schema of the database {sqlite_url} is at 9999_from_the_future, a revision of a newer kbms" in line


def test_a_bad_key_scope_is_one_line() -> None:
    code, _, stderr = invoke("keys", "create", "--name", "ci", "--scope", "everything")
    assert code == USAGE
    assert one_line(stderr).startswith("kbms: scopes.0: Input should be")
