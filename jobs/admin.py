"""Operator commands that act on the service's database directly: ``python -m jobs.admin``.

Why a module of its own: API keys must exist before anyone can call the API, so creating the
first one cannot go over HTTP. The ``pcd`` client runs this module as a subprocess for
``pcd keys create``, which keeps the client package HTTP-only (DESIGN.md arrows) while the
bootstrap still needs one command.
"""

from __future__ import annotations

import argparse
import sys

from jobs import db, service


def create_key(team: str, name: str) -> str:
    """Migrate if needed, create ``team`` if missing, and return a new key's plaintext."""
    db.upgrade_to_head()  # idempotent; keys are usually made before the first `pcd serve`
    with db.session_scope() as session:
        return service.create_api_key(session, team, name)


def revoke_key(key: str) -> bool:
    """Revoke a key by its plaintext; False when it was unknown or already revoked."""
    with db.session_scope() as session:
        return service.revoke_api_key(session, key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="create an API key (printed once, on stdout)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", default="cli")
    revoke = sub.add_parser("revoke-key", help="revoke an API key")
    revoke.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "create-key":
        print(create_key(args.team, args.name))
        return 0
    if revoke_key(args.key):
        return 0
    print("no such live key", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
