"""The README's commands work as written: every ```bash block of README.md runs, in order, against a real kbms.

The quick start ("Try it") assumes ``make run`` in another terminal. Its block is marked
``<!-- readme-test: server (...) -->``: this test starts kbms as the Makefile's ``run`` does (``.venv/bin/kbms
migrate``, then ``.venv/bin/kbms serve``), with the variables that block sets, on a fresh SQLite database at the
default place (``data/kbms.db``), in a temporary copy of the repository: what the blocks write stays there. Each
block then runs on its own with ``bash -euo pipefail``, ``.venv/bin`` first on PATH, and must exit 0 (the README's
curls use ``--fail-with-body``, so a 4xx or 5xx fails the block). The one rewrite: ``localhost:8000`` and
``127.0.0.1:8000`` become a free port, so a run never meets another server.

Where a comment in a block shows an answer, each of its JSON fields (``"created":7``) must be in the block's
output, except elided values (``"79c92344-..."``).

A block that cannot run here (``make test`` would run this suite again; PostgreSQL; placeholder keys) carries
``<!-- readme-test: skip (reason) -->`` on the line before it. Their number is pinned, so a new block is run, never
silently skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from tests.conftest import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIPPED = 3  # Run it / test it, On PostgreSQL, API keys
SERVERS = 1  # the quick start's make run
FENCE = re.compile(r"^\s*```(\S*)\s*$")
MARKER = re.compile(r"^<!-- readme-test: (skip|server) \((.+)\) -->$")
MAKE_RUN = re.compile(r"^((?:[A-Z][A-Z0-9_]*=\S+\s+)*)make run$")
# A JSON field shown in a comment: "key": value, the value a string, a number, true, false or null.
SHOWN_FIELD = re.compile(r'"(\w+)":\s*("[^"]*"|-?\d+(?:\.\d+)?|true|false|null)')
DEFAULT_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")
BLOCK_TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    text: str
    marker: str | None  # "skip", "server", or None: run it


def bash_blocks(readme: str) -> list[Block]:
    lines = readme.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if FENCE.match(lines[j]))
        if fence[1] == "bash":
            marker = MARKER.match(lines[index - 1]) if index else None
            text = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(line=index + 1, text=text, marker=marker[1] if marker else None))
        index = end + 1
    return blocks


def commands(block: Block) -> list[str]:
    """The block's lines that are not comments, with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def shown_fields(block: Block) -> list[tuple[str, str]]:
    """The JSON fields the block's comment lines show as answers, but for elided values ("79c9...", "…")."""
    comments = (line.strip() for line in block.text.splitlines() if line.strip().startswith("#"))
    fields = (field for comment in comments for field in SHOWN_FIELD.findall(comment))
    return [(key, value) for key, value in fields if "..." not in value and "…" not in value]


def server_variables(block: Block) -> dict[str, str]:
    """``A=1 B=2 make run`` -> {"A": "1", "B": "2"}: what the test's server gets, as the README's would."""
    (command,) = commands(block)
    match = MAKE_RUN.fullmatch(command)
    assert match is not None, f"README.md:{block.line}: a server block is `[VAR=value ...] make run`, not {command!r}"
    return dict(word.split("=", 1) for word in shlex.split(match[1]))


def test_every_bash_block_is_run_or_marked() -> None:
    readme = README.read_text(encoding="utf-8")
    blocks = bash_blocks(readme)
    markers = [b.marker for b in blocks]
    assert (markers.count("skip"), markers.count("server")) == (SKIPPED, SERVERS)
    # A marker is on the line right before a ```bash fence, or it marks nothing: a stale one fails here.
    assert len([line for line in readme.splitlines() if MARKER.match(line)]) == SKIPPED + SERVERS
    assert markers.index("server") < markers.index(None)  # the server comes up before the first command
    for block in blocks:
        if block.marker is None:
            for command in commands(block):
                # curl without --fail-with-body exits 0 on a 4xx, and the test would not see it.
                assert "curl " not in command or "--fail-with-body" in command, f"README.md:{block.line}: {command}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the repository (what a fresh clone has), with the .venv the tests run from."""
    work = tmp_path / "kbms"
    ignored = shutil.ignore_patterns(".git", ".venv", "data", "*_cache", ".hypothesis", "__pycache__", "out")
    shutil.copytree(ROOT, work, ignore=ignored)
    (work / ".venv").symlink_to(sys.prefix)
    assert (work / ".venv" / "bin" / "kbms").exists(), f"run the tests from the project's virtualenv, not {sys.prefix}"
    return work


def start(workdir: Path, env: dict[str, str], log: Path) -> LiveServer:
    """What ``make run`` does: ``$(BIN)/kbms migrate``, then ``$(BIN)/kbms serve``."""
    kbms = str(workdir / ".venv" / "bin" / "kbms")
    migrated = subprocess.run([kbms, "migrate"], cwd=workdir, env=env, capture_output=True, text=True, check=False)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with log.open("ab") as output:  # the child keeps its own descriptor
        process = subprocess.Popen([kbms, "serve"], cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT)
    server = LiveServer(url=f"http://127.0.0.1:{env['KBMS_PORT']}", process=process, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"kbms serve exited with {process.returncode}:\n{log.read_text()}"
        try:
            if httpx2.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx2.TransportError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"kbms serve did not become healthy:\n{log.read_text()}")


@pytest.mark.slow
def test_every_bash_block_runs_as_written(workdir: Path, tmp_path: Path) -> None:
    blocks = bash_blocks(README.read_text(encoding="utf-8"))
    (server_block,) = [b for b in blocks if b.marker == "server"]
    variables = server_variables(server_block)
    port = free_port()
    # Nothing from the caller's KBMS_* environment (a database URL, API keys) may change what the blocks see.
    env = {name: value for name, value in os.environ.items() if not name.startswith("KBMS_")}
    env.update(
        PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        KBMS_DATABASE_URL=f"sqlite:///{workdir / 'data' / 'kbms.db'}",  # the default place, pinned
        KBMS_PORT=str(port),
    )
    log = tmp_path / "server.log"
    server = start(workdir, {**env, **variables}, log)
    outputs = []
    try:
        for block in blocks:
            if block.marker is not None:
                continue
            script = block.text
            for address in DEFAULT_ADDRESSES:
                script = script.replace(address, f"127.0.0.1:{port}")
            assert ":8000" not in script, f"README.md:{block.line}: an address the test does not rewrite"
            ran = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
                check=False,
            )
            where = f"README.md:{block.line}:\n{block.text}\nstdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
            assert ran.returncode == 0, f"{where}\nexit code {ran.returncode}; server log:\n{log.read_text()[-4000:]}"
            for key, value in shown_fields(block):
                shown = re.compile(rf'"{key}":\s*{re.escape(value)}(?![\w.])')
                assert shown.search(ran.stdout), f'{where}\nthe README shows "{key}": {value}, the output does not'
            outputs.append(ran.stdout + ran.stderr)
    finally:
        server.stop()
    # The blocks' secrets are demo values, but kbms must treat them as secrets all the same.
    for name, value in variables.items():
        if name.endswith("_SECRET"):
            assert value not in log.read_text()
            assert not any(value in output for output in outputs)
