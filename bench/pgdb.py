"""Throwaway PostgreSQL databases for the benchmarks: created, checked and dropped on a local server.

    python bench/pgdb.py check  ADMIN_URL
    python bench/pgdb.py create ADMIN_URL NAME [--drop-prefix PREFIX]
    python bench/pgdb.py drop   ADMIN_URL PREFIX

``ADMIN_URL`` is a server URL without a database (``postgresql://postgres@127.0.0.1:5432``); the statements run on its
``postgres`` database. ``create`` first drops every database named ``PREFIX*`` (the previous round's: the harness has
stopped its server by then), so that a run leaves at most one behind, which ``drop`` removes at the end. Names are
made by the benchmarks from a prefix, a pid and a port: only ``[a-z0-9_]`` is accepted.
"""

from __future__ import annotations

import argparse
import re
import sys

import psycopg
from psycopg import sql

NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def server_url(admin_url: str) -> str:
    return admin_url.rstrip("/") + "/postgres"


def database_url(admin_url: str, name: str) -> str:
    """What kbms is given: the same server, that database."""
    return f"{admin_url.rstrip('/')}/{name}"


def reachable(admin_url: str) -> str | None:
    """None when the server answers, else why not (one line)."""
    try:
        with psycopg.connect(server_url(admin_url), connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def postmaster_pid(admin_url: str) -> int | None:
    """The server's main process, when it runs on this machine in our pid namespace: the parent of the backend
    that serves this connection. None when it cannot be seen (another host, a container)."""
    try:
        with psycopg.connect(server_url(admin_url), connect_timeout=3) as connection:
            row = connection.execute("SELECT pg_backend_pid()").fetchone()
            if row is None:
                return None
            with open(f"/proc/{int(row[0])}/stat") as f:
                data = f.read()
    except (psycopg.Error, OSError):
        return None
    parent = int(data[data.rindex(")") + 2 :].split()[1])
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return None
    return parent if b"postgres" in command else None


def drop(admin_url: str, prefix: str) -> list[str]:
    if not NAME.match(prefix):
        sys.exit(f"not a benchmark database prefix: {prefix!r}")
    with psycopg.connect(server_url(admin_url), autocommit=True, connect_timeout=10) as connection:
        rows = connection.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
        names = [row[0] for row in rows]
        for name in names:
            # FORCE: a server stopped a moment ago may leave a backend that has not exited yet.
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return names


def create(admin_url: str, name: str, drop_prefix: str | None) -> None:
    if not NAME.match(name):
        sys.exit(f"not a benchmark database name: {name!r}")
    if drop_prefix:
        drop(admin_url, drop_prefix)
    with psycopg.connect(server_url(admin_url), autocommit=True, connect_timeout=10) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check")
    check.add_argument("admin_url")
    make = commands.add_parser("create")
    make.add_argument("admin_url")
    make.add_argument("name")
    make.add_argument("--drop-prefix")
    remove = commands.add_parser("drop")
    remove.add_argument("admin_url")
    remove.add_argument("prefix")
    args = parser.parse_args()
    if args.command == "check":
        problem = reachable(args.admin_url)
        if problem:
            sys.exit(f"PostgreSQL not reachable at {args.admin_url}: {problem}")
    elif args.command == "create":
        create(args.admin_url, args.name, args.drop_prefix)
    else:
        drop(args.admin_url, args.prefix)


if __name__ == "__main__":
    main()
