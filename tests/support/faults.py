"""Real faults for tests: files the kernel refuses to write, a filesystem that fills up, a lock held by another
process, a PostgreSQL server of the test's own to restart and crash. No store method is replaced: the kernel,
SQLite or PostgreSQL refuses, as in production. A helper skips its test when the machine does not allow the fault
(mounting needs root, for instance), saying why."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT_USER = os.geteuid() == 0


@contextmanager
def unwritable(*paths: Path, open_files_too: bool = False) -> Iterator[None]:
    """Files and directories that refuse writes while the block runs.

    As root, permissions change nothing (root ignores them), so this sets the immutable attribute (chattr +i),
    which stops root too, and also writes through descriptors opened before. Another user gets read-only
    permissions, which stop new opens only: ``open_files_too`` then skips the test.
    """
    if ROOT_USER:
        done: list[Path] = []
        try:
            for path in paths:
                result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    pytest.skip(f"chattr +i is not available here: {result.stderr.strip()}")
                done.append(path)
            yield
        finally:
            for path in done:
                subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    if open_files_too:
        pytest.skip("only the immutable attribute (root) stops writes through descriptors already open")
    modes = {path: path.stat().st_mode for path in paths}
    try:
        for path in paths:
            path.chmod(modes[path] & ~0o222)
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@contextmanager
def small_filesystem(directory: Path, *, size_kib: int) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` mounted on ``directory``: a disk that really fills up (ENOSPC)."""
    directory.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "kbms-test", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s filesystem; delete the returned file to give them back."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


# Each holder prints "held" once it has the lock, and keeps it until its stdin closes.
HOLD_SQLITE_WRITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
"""
HOLD_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_by_another_process(program: str, path: Path) -> Iterator[None]:
    """Another process holds a lock on ``path`` (one of the programs above) while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", program, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()


def _postgres_bindir() -> Path | None:
    configured = shutil.which("pg_config")
    if configured:
        found = subprocess.run([configured, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own (``initdb`` in a temporary directory, on a free port), so that it can
    be restarted, or crashed, without disturbing the shared test server. fsync stays on: a crash must keep every
    committed transaction."""

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        if bindir is None:
            pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
        self._bin = bindir
        # PostgreSQL refuses to run as root: then it runs as the system's postgres user.
        self._user: str | None = None
        if ROOT_USER:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root, and there is no postgres user to run a server as")
            self._user = "postgres"
        self.directory = Path(tempfile.mkdtemp(prefix="kbms-pg-"))
        if self._user is not None:
            shutil.chown(self.directory, self._user)
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8")

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self._bin / program), *args], capture_output=True, text=True, user=self._user, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed:\n{result.stdout}\n{result.stderr}")

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        data, log = str(self.directory / "data"), str(self.directory / "log")
        self._run("pg_ctl", "-D", data, "-l", log, "-w", *args, "-o", options)

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash (recovery at start)."""
        self._ctl("stop", "-m", mode)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server and its backends stopped (SIGSTOP) while the block runs: connections stay up, the kernel
        still accepts new ones, and nothing answers, as with a server whose disk has stalled."""
        postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        processes = [postmaster, *_children(postmaster)]
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in processes:
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # it was not running
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def _children(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after its last ")".
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == parent:
                children.append(int(stat.parent.name))
    return children
