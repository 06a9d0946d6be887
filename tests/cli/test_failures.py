"""How kbms fails: one line on stderr naming the database and the next step, the documented exit code, no
traceback (unless asked for with --debug), and no file left behind.

Each failure is checked through the CLI runner and in a real process (``python -m kbms``): only a process shows
what a user sees, a traceback included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
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
from kbms.storage import admin_engine
from tests.conftest import free_port, postgres_schema, require_postgres
from tests.support.faults import HOLD_FLOCK, HOLD_SQLITE_WRITE_LOCK, held_by_another_process
from tests.support.helpers import intercom_payload, zendesk_pushes

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
    for placeholder in ("<bool>", "<str>", "<int>", "<datetime>", "<path>", "<file>", "{", " TEXT ", " INTEGER "):
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
    where = tmp_path / "elsewhere" / "kbms.db"
    assert line == f"kbms: no database at {where}: run kbms migrate with the same --database-url first"
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
    assert line.endswith(": run kbms migrate with the same --database-url")
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
    shown = make_url(url).render_as_string(hide_password=True)
    assert one_line(result.stderr) == (
        f"kbms: the server refused the database {shown} ({reason}): fix the user, password or database name in "
        "KBMS_DATABASE_URL / --database-url"
    )
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


@pytest.mark.parametrize(
    ("program", "locked"),
    [
        pytest.param(HOLD_SQLITE_WRITE_LOCK, "", id="sqlite-write-transaction"),
        # A stopped kbms holding its lock file: the command waited for it forever.
        pytest.param(HOLD_FLOCK, ".writer-lock", id="kbms-writer-lock"),
    ],
)
def test_ingest_while_another_process_holds_the_write_lock_is_exit_3(
    tmp_path: Path, sqlite_url: str, program: str, locked: str
) -> None:
    """KBMS_DB_TIMEOUT bounds the command's wait: the half second given here, not SQLite's own 10 s."""
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    with held_by_another_process(program, Path((make_url(sqlite_url).database or "") + locked)):
        result = run("ingest", "in.ndjson", "--database-url", sqlite_url, cwd=tmp_path, env={"KBMS_DB_TIMEOUT": "0.5"})
    assert result.returncode == DATABASE
    line = one_line(result.stderr)
    assert line.startswith(f"kbms: the database {sqlite_url} is locked by another process")
    assert line.endswith(
        "then run again (KBMS_DB_TIMEOUT sets how long kbms waits for it); the lines counted above are committed, "
        "and running it again leaves them unchanged"
    )


def test_migrate_waits_for_the_lock_as_long_as_kbms_db_timeout_says(tmp_path: Path, sqlite_url: str) -> None:
    """The holder lets go after 5 s: within SQLite's own 10 s, beyond the 0.2 s KBMS_DB_TIMEOUT gives here."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SQLITE_WRITE_LOCK, make_url(sqlite_url).database or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    release = threading.Timer(5, holder.stdin.close)
    try:
        assert holder.stdout.readline().strip() == "held"
        release.start()
        code, _, stderr = invoke("migrate", "--database-url", sqlite_url, env={"KBMS_DB_TIMEOUT": "0.2"})
    finally:
        release.cancel()
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert code == DATABASE
    assert one_line(stderr).startswith(f"kbms: the database {sqlite_url} is locked by another process")


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
        (
            "KBMS_DATABASE_URL",
            f"postgresql://u:{PASSWORD}@127.0.0.1/db?ssl=true",
            'kbms: KBMS_DATABASE_URL: invalid connection option "ssl"',
        ),
        (
            "KBMS_DATABASE_URL",
            f"postgresql://u@127.0.0.1/db?password={PASSWORD}&sslmode=require&foo=bar",
            'kbms: KBMS_DATABASE_URL: invalid connection option "foo"',
        ),
        ("KBMS_DATABASE_URL", "sqlite:///kbms.db?timeout=abc", "kbms: KBMS_DATABASE_URL: the SQLite option ?timeout="),
        ("KBMS_DATABASE_URL", "sqlite:///kbms.db?foo=bar", "kbms: KBMS_DATABASE_URL: the SQLite option ?foo="),
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
    for other in ("nope", "\udcff", "ABCDEF00-0000-0000-0000-000000000000"):  # not an id kbms mints: not looked up
        result = run("reprocess", "--conversation-id", other, "--database-url", database_url, cwd=tmp_path)
        assert result.returncode == USAGE
        line = one_line(result.stderr)
        assert line.startswith("kbms: --conversation-id "), line
        assert "not a conversation id" in line or "is not UTF-8 text" in line, line


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
        (
            ("export", "--out", "x", "--database-url"),
            "kbms: Option '--database-url' requires an argument (see kbms export --help)",
        ),
        (("keys", "create", "--name"), "kbms: Option '--name' requires an argument (see kbms keys create --help)"),
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
    assert result.exit_code == USAGE  # no command given: a usage error, answered with the help
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


@pytest.mark.parametrize(
    ("url", "option"),
    [
        (f"postgresql://u:{PASSWORD}@127.0.0.1/db?ssl=true", 'invalid connection option "ssl"'),
        ("sqlite:///kbms.db?check_same_thread=maybe", "the SQLite option ?check_same_thread="),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "export"])
def test_a_database_url_option_kbms_cannot_use_is_exit_2(tmp_path: Path, url: str, option: str, command: str) -> None:
    args = ("migrate",) if command == "migrate" else ("export", "--out", "out.ndjson")
    result = run(*args, "--database-url", url, cwd=tmp_path)
    assert result.returncode == USAGE
    assert one_line(result.stderr).startswith(f"kbms: --database-url: {option}")
    assert PASSWORD not in result.stdout + result.stderr
    assert files_under(tmp_path) == set()
    code, _, stderr = invoke(*args, "--database-url", url)
    assert (code, one_line(stderr)) == (USAGE, one_line(result.stderr))


NOT_UTF8 = "\udcff"  # what Python makes of the byte 0xff in a command line


@pytest.mark.parametrize(
    "args",
    [
        ("export", "--out", "out.ndjson", "--tag", NOT_UTF8),
        ("export", "--out", "out.ndjson", "--workspace", "caf\udce9"),
        ("export", "--out", "out.ndjson", "--state", NOT_UTF8),
        ("export", "--out", "out.ndjson", "--provider", NOT_UTF8),
        ("ingest", "in.ndjson", "--workspace", "caf\udce9"),
        ("reprocess", "--conversation-id", NOT_UTF8),
        ("reprocess", "--provider", NOT_UTF8),
    ],
    ids=lambda args: " ".join(a for a in args if a.startswith("--") and a != "--out") + f" ({args[0]})",
)
def test_text_that_is_not_utf8_in_an_option_is_exit_2(tmp_path: Path, database_url: str, args: tuple[str, ...]) -> None:
    ndjson(tmp_path / "in.ndjson", [intercom_payload("a")])
    args = tuple(str(tmp_path / arg) if arg == "in.ndjson" else arg for arg in args)
    flag = args[-2]
    result = run(*args, "--database-url", database_url, cwd=tmp_path)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    assert line.startswith(f"kbms: {flag} "), line
    assert "not UTF-8 text" in line or "Unknown provider" in line or "--state" in line, line
    code, _, stderr = invoke(*args, "--database-url", database_url)
    assert code == USAGE
    assert one_line(stderr).startswith(f"kbms: {flag} ")


def test_a_database_path_that_is_not_utf8_is_shown_escaped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd1' / NOT_UTF8}.db"
    result = run("migrate", cwd=tmp_path, env={"KBMS_DATABASE_URL": url})
    assert (result.returncode, result.stderr) == (0, "")
    assert "\\xff.db migrated from empty to" in result.stdout
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / f"{NOT_UTF8}.db").touch()  # a file, but no schema in it
    env = {"KBMS_DATABASE_URL": f"sqlite:///{tmp_path / 'd2' / NOT_UTF8}.db"}
    result = run("export", "--out", "out.ndjson", cwd=tmp_path, env=env)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    assert "xff.db is not migrated" in line
    assert line.endswith(": run kbms migrate")


@pytest.mark.parametrize(
    "url", [f"postgresql://u:{PASSWORD}@127.0.0.1/db", f"postgresql://u@127.0.0.1/db?password={PASSWORD}"]
)
def test_a_misplaced_database_url_is_not_printed_with_its_password(tmp_path: Path, url: str) -> None:
    """The URL given without --database-url comes back in the usage message: without its password."""
    result = run("migrate", url, cwd=tmp_path)
    assert result.returncode == USAGE
    line = one_line(result.stderr)
    assert line.startswith("kbms: Got unexpected extra argument")
    assert "postgresql://u" in line
    assert "***" in line
    assert PASSWORD not in result.stdout + result.stderr
    code, _, stderr = invoke("migrate", url)
    assert (code, one_line(stderr)) == (USAGE, line)


def test_serve_binds_as_uvicorn_does(tmp_path: Path) -> None:
    """A name resolving to IPv6 first: uvicorn binds it as IPv4 (IPv6 only for a host with ':'), and so must the
    socket kbms binds before it (a private /etc/hosts, in a mount namespace of the test's own)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 kbms-test-host\n127.0.0.1 kbms-test-host\n")
    program = (
        "import socket, uvicorn\n"
        "from kbms.server import listening_socket\n"
        "resolved = socket.getaddrinfo('kbms-test-host', 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)\n"
        "ours = listening_socket('kbms-test-host', 0)\n"
        "theirs = uvicorn.Config(app=None, host='kbms-test-host', port=0, log_config=None).bind_socket()\n"
        "print(resolved[0][0].name, ours.family.name, ours.getsockname()[0], theirs.family.name)\n"
    )
    script = f'mount --bind {hosts} /etc/hosts && exec {sys.executable} -c "$0"'
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare here")
    result = subprocess.run(
        [unshare, "--mount", "sh", "-c", script, program], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0 and not result.stdout and "Traceback" not in result.stderr:
        # The program never ran: no mount namespace here (not root, or no CAP_SYS_ADMIN in a container).
        pytest.skip(f"cannot mount a private /etc/hosts here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    first, ours, address, theirs = result.stdout.split()
    if first != "AF_INET6":
        pytest.skip(f"this resolver answers {first} first for a name listed as ::1 then 127.0.0.1: not the case here")
    assert (ours, address) == (theirs, "127.0.0.1") == ("AF_INET", "127.0.0.1")


@pytest.mark.postgres
def test_postgresql_refusing_a_privilege_names_it(tmp_path: Path) -> None:
    """A user who may not create tables in the schema: the server answered, so nothing is to be started."""
    role = f"kbms_t_{uuid.uuid4().hex[:12]}"
    admin = admin_engine(require_postgres())
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        with postgres_schema(migrated=False) as url:
            as_role = make_url(url).set(username=role, password=PASSWORD).render_as_string(hide_password=False)
            no_schema = run("migrate", "--database-url", as_role, cwd=tmp_path)
            schema = str(make_url(url).query["options"]).removeprefix("-csearch_path=")
            with admin.begin() as conn:
                conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
            result = run("migrate", "--database-url", as_role, cwd=tmp_path)
            with admin.begin() as conn:
                conn.exec_driver_sql(f'REVOKE USAGE ON SCHEMA "{schema}" FROM "{role}"')
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()
    assert result.returncode == DATABASE
    line = one_line(result.stderr)
    assert line.startswith(f"kbms: the user of the database postgresql://{role}:***@")
    assert line.endswith(
        "lacks a privilege (InsufficientPrivilege): grant it (kbms migrate creates tables in the schema), or name "
        "another user in KBMS_DATABASE_URL / --database-url"
    )
    assert PASSWORD not in result.stdout + result.stderr
    assert no_schema.returncode == DATABASE  # without USAGE on it, search_path selects no schema at all
    assert "has no schema for kbms (InvalidSchemaName): create the schema that search_path names" in one_line(
        no_schema.stderr
    )
