"""The kbms command: migrate, ingest (NDJSON, JSON documents and arrays) and the schema check of serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from kbms.cli import app
from kbms.storage import admin_engine
from kbms.storage.schema import conversations
from tests.conftest import migrate
from tests.support.helpers import INTERCOM, intercom_payload, part

runner = CliRunner()


def kbms(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def counts(output: str) -> list[str]:
    """The created / updated / unchanged / rejected cells of the summary table."""
    row = [line for line in output.splitlines() if line.strip().startswith("│")][-1]
    return [cell.strip() for cell in row.split("│")[1:5]]


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'kbms.db'}"
    code, output = kbms("migrate", "--database-url", url)
    assert (code, "from empty to 0005" in output) == (0, True)
    code, output = kbms("migrate", "--database-url", url)
    assert (code, "already at revision 0005" in output) == (0, True)


def test_ingest_ndjson_reports_every_outcome_with_line_numbers(tmp_path: Path, database_url: str) -> None:
    lines = [
        json.dumps(intercom_payload("a")),
        "{not json",
        json.dumps(intercom_payload("")),
        "",
        json.dumps(intercom_payload("b", parts=[part("p1")])),
        json.dumps(intercom_payload("a")),
        json.dumps(intercom_payload("b", updated_at=1_800_000_000, parts=[part("p2")])),
    ]
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join(lines) + "\n")
    code, output = kbms("ingest", str(path), "--database-url", database_url)
    assert code == 1
    assert counts(output) == ["2", "1", "1", "2"]  # created, updated, unchanged, rejected
    assert "line 2: rejected: Malformed JSON body" in output
    assert "line 3: rejected: id: Id should not be empty (string_too_short)" in output


def test_ingest_a_pretty_printed_json_document(database_url: str) -> None:
    code, output = kbms("ingest", str(INTERCOM / "01_rest_get_conversation_v2.16.json"), "--database-url", database_url)
    assert code == 0, output
    assert counts(output) == ["1", "0", "0", "0"]


def test_ingest_a_json_array(tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "many.json"
    path.write_text(json.dumps([intercom_payload(f"c{i}") for i in range(3)], indent=2))
    code, output = kbms("ingest", str(path), "--database-url", database_url)
    assert code == 0, output
    assert counts(output) == ["3", "0", "0", "0"]


def test_ingest_uses_the_workspace_option(tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "one.ndjson"
    path.write_text(json.dumps(intercom_payload("w")) + "\n")
    assert kbms("ingest", str(path), "--workspace", "ws1", "--database-url", database_url)[0] == 0
    assert kbms("ingest", str(path), "--workspace", "ws2", "--database-url", database_url)[0] == 0
    engine = admin_engine(database_url)
    with engine.connect() as conn:
        workspaces = sorted(conn.execute(select(conversations.c.workspace)).scalars())
    engine.dispose()
    assert workspaces == ["ws1", "ws2"]


@pytest.mark.parametrize("command", ["serve", "ingest"])
def test_refuses_a_database_that_is_not_migrated(empty_database_url: str, command: str) -> None:
    url = empty_database_url
    args = ["ingest", str(INTERCOM / "01_rest_get_conversation_v2.16.json")] if command == "ingest" else ["serve"]
    code, output = kbms(*args, "--database-url", url)
    assert code == 2
    assert "kbms migrate" in output


def test_unknown_provider_is_a_usage_error(database_url: str) -> None:
    code, output = kbms(
        "ingest",
        str(INTERCOM / "01_rest_get_conversation_v2.16.json"),
        "--provider",
        "nope",
        "--database-url",
        database_url,
    )
    assert code == 2
    assert "Unknown provider 'nope'" in output


def test_bad_settings_are_reported(database_url: str) -> None:
    code, output = kbms("migrate", env={"KBMS_DATABASE_URL": database_url, "KBMS_MAX_BODY_BYTES": "lots"})
    assert code == 2
    assert "KBMS_MAX_BODY_BYTES" in output


def test_unsupported_database_url_is_reported() -> None:
    code, output = kbms("migrate", "--database-url", "mysql://x/y")
    assert code == 2
    assert "unsupported database" in output


def test_a_bad_first_line_costs_that_line_only(tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "in.ndjson"
    path.write_text("garbage{\n" + json.dumps(intercom_payload("a")) + "\n" + json.dumps(intercom_payload("b")) + "\n")
    code, output = kbms("ingest", str(path), "--database-url", database_url)
    assert code == 1
    assert counts(output) == ["2", "0", "0", "1"]
    assert "line 1: rejected: Malformed JSON body" in output


@pytest.mark.parametrize("content", [b'[{"id": "a"}, garbage]', b"[\xff]"])
def test_a_broken_json_array_is_reported_not_a_traceback(tmp_path: Path, database_url: str, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    code, output = kbms("ingest", str(path), "--database-url", database_url)
    assert code == 2
    assert "is not one" in output


def test_workspace_option_is_validated(tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "one.ndjson"
    path.write_text(json.dumps(intercom_payload("w")) + "\n")
    code, output = kbms("ingest", str(path), "--workspace", "a b/%", "--database-url", database_url)
    assert code == 2
    assert "--workspace" in output


def test_large_files_are_spread_over_worker_processes(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Workers ingest chunks in any order; the database ends up as one process would leave it; and they end
    quietly (they write to this process's standard error, which capfd holds)."""
    lines = []
    for i in range(30):
        lines.append(json.dumps(intercom_payload(f"c{i % 12}", updated_at=1_700_000_000 + i, parts=[part(f"p{i}")])))
        if i % 10 == 3:
            lines.append("{broken")
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr("kbms.backfill.POOL_MIN_BYTES", 0)
    monkeypatch.setattr("kbms.backfill.CHUNK_LINES", 4)
    code, output = kbms("ingest", str(path), "--jobs", "2", "--database-url", database_url)
    assert code == 1, output
    assert counts(output) == ["12", "18", "0", "3"]
    assert [line for line in output.splitlines() if "rejected:" in line] == [
        "line 5: rejected: Malformed JSON body",
        "line 16: rejected: Malformed JSON body",
        "line 27: rejected: Malformed JSON body",
    ]
    assert capfd.readouterr().err == ""

    alone = migrate(f"sqlite:///{tmp_path / 'alone.db'}")
    assert kbms("ingest", str(path), "--jobs", "1", "--database-url", alone)[0] == 1
    assert details(database_url) == details(alone)


def details(database_url: str) -> dict[str, str]:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(conversations.c.external_id, conversations.c.detail))
            return {external_id: detail for external_id, detail in rows}
    finally:
        engine.dispose()


def test_jobs_must_be_positive(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "in.ndjson"
    path.write_text(json.dumps(intercom_payload("a")) + "\n")
    code, output = kbms("ingest", str(path), "--jobs", "0", "--database-url", sqlite_url)
    assert (code, "--jobs" in output) == (2, True)


def test_a_bug_stops_the_ingest_loudly_and_keeps_what_was_committed(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbms.providers.intercom import IntercomProvider

    original = IntercomProvider.parse_push

    def broken(self: IntercomProvider, body: bytes, **kwargs: str | None) -> object:
        if b'"boom"' in body:
            raise RuntimeError("a bug in a mapper")
        return original(self, body, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(IntercomProvider, "parse_push", broken)
    monkeypatch.setattr("kbms.backfill.CHUNK_LINES", 2)
    lines = [json.dumps(intercom_payload(name)) for name in ("a", "b", "boom", "d", "e", "f", "g", "h")]
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["ingest", str(path), "--jobs", "1", "--database-url", sqlite_url])
    assert result.exit_code != 0
    assert isinstance(result.exception, RuntimeError)
    assert set(details(sqlite_url)) <= {"a", "b", "d", "e", "f", "g", "h"}
    assert {"a", "b"} <= set(details(sqlite_url))
