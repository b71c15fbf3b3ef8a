"""``trioflow token create|list|revoke|audit``: API tokens, on the store or over the API.

With ``--store URL`` the command works on the store directly (a SQLite file
or PostgreSQL), also while a server uses it: token rows are written in their
own short transactions and servers read them again within two seconds.
With ``--url`` (and an admin ``--token``) it goes through a server's API.
The token's text is printed once, on creation; the store keeps a hash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from trioflow import EngineError
from trioflow.stores import open_store_from_url
from trioflow.stores.base import AuditEntry, Store
from trioflow.stores.memory import MemoryStore

from .auth import ROLES, audit_view, auth_pepper, make_token, token_view
from .cli import EXIT_OK, _age, _fail, auth_headers


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


async def _on_store(url: str, work: Callable[[Store], Any]) -> Any:
    store = open_store_from_url(url)
    if isinstance(store, MemoryStore):
        raise EngineError("a memory store lives inside the process that opened it: use --url")
    await store.open()
    try:
        return await work(store)
    finally:
        await store.aclose()


async def _over_api(
    url: str, token: str | None, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    import httpx

    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), timeout=30, headers=auth_headers(token)
    ) as client:
        response = await client.request(method, path, json=body)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": {"message": response.text[:200]}}


def _api_error(status: int, answer: Any) -> int:
    message = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
    return _fail(f"the server answered {status}: {message}")


def _print_tokens(items: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for item in items:
            print(json.dumps(item))
        return
    print(
        f"{'ID':<16}  {'NAME':<20} {'ROLE':<7} {'STATE':<8} {'EXPIRES':<16} "
        f"{'LAST USED':<16} GRAPHS"
    )
    for t in items:
        print(
            f"{t['token_id']:<16}  {t['name'][:20]:<20} {t['role']:<7} {t['state']:<8} "
            f"{_when(t['expires_at']):<16} {_when(t['last_used_at']):<16} {','.join(t['graphs'])}"
        )


def cmd_token_create(args: argparse.Namespace) -> int:
    try:
        expires = _age(args.expires) if args.expires else None
    except argparse.ArgumentTypeError as exc:
        return _fail(f"--expires: {exc}")
    graphs = args.graphs or ["*"]
    if args.store:
        try:
            pepper = auth_pepper()
            record, text = make_token(
                args.name, args.role, graphs, pepper=pepper, now=time.time(), expires_in=expires
            )
        except ValueError as exc:
            return _fail(str(exc))

        async def create(store: Store) -> None:
            await store.put_token(record)
            entry = AuditEntry(
                0, time.time(), "local", "token create", f"token {record.token_id}", 201
            )
            await store.add_audit([entry])

        try:
            trio.run(_on_store, args.store, create)
        except EngineError as exc:
            return _fail(exc.message)
        view: dict[str, Any] = token_view(record, time.time())
    else:
        body: dict[str, Any] = {"name": args.name, "role": args.role, "graphs": graphs}
        if expires is not None:
            body["expires_in_s"] = expires
        status, answer = trio.run(_over_api, args.url, args.token, "POST", "/auth/tokens", body)
        if status != 201:
            return _api_error(status, answer)
        text = answer.pop("token")
        view = answer
    print(text)
    print(
        f"token {view['token_id']} ({view['name']}, role {view['role']}, graphs "
        f"{','.join(view['graphs'])}, expires {_when(view['expires_at'])}); the line above "
        "is its secret: it is shown this once",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    if args.store:

        async def read(store: Store) -> list[dict[str, Any]]:
            now = time.time()
            return [token_view(t, now) for t in await store.list_tokens()]

        try:
            items = trio.run(_on_store, args.store, read)
        except EngineError as exc:
            return _fail(exc.message)
    else:
        status, answer = trio.run(_over_api, args.url, args.token, "GET", "/auth/tokens")
        if status != 200:
            return _api_error(status, answer)
        items = answer["items"]
    _print_tokens(items, args.json)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    token_id = args.token_id
    if args.store:

        async def revoke(store: Store) -> Any:
            token = await store.revoke_token(token_id, time.time())
            if token is not None:
                entry = AuditEntry(
                    0, time.time(), "local", "token revoke", f"token {token_id}", 200
                )
                await store.add_audit([entry])
            return token

        try:
            token = trio.run(_on_store, args.store, revoke)
        except EngineError as exc:
            return _fail(exc.message)
        if token is None:
            return _fail(f"no token {token_id!r}")
    else:
        path = f"/auth/tokens/{token_id}/revoke"
        status, answer = trio.run(_over_api, args.url, args.token, "POST", path, {})
        if status != 200:
            return _api_error(status, answer)
    print(f"token {token_id} revoked; servers refuse it within 2 s")
    return EXIT_OK


def cmd_token_audit(args: argparse.Namespace) -> int:
    if args.store:

        async def read(store: Store) -> list[dict[str, Any]]:
            entries = await store.read_audit(after=args.after, limit=args.limit)
            return [audit_view(e) for e in entries]

        try:
            items = trio.run(_on_store, args.store, read)
        except EngineError as exc:
            return _fail(exc.message)
    else:
        path = f"/auth/audit?after={args.after}&limit={args.limit}"
        status, answer = trio.run(_over_api, args.url, args.token, "GET", path)
        if status != 200:
            return _api_error(status, answer)
        items = answer["items"]
    for item in items:
        if args.json:
            print(json.dumps(item))
        else:
            print(
                f"{item['seq']:>6} {_when(item['ts'])} {item['actor']:<16} {item['status']} "
                f"{item['action']} {item['target']} {item['detail']}".rstrip()
            )
    return EXIT_OK


_EPILOG = (
    "exit codes:\n  0  done\n"
    "  3  refused (bad option, unknown token, no access), store or server unreachable"
)


def add_token_parser(sub: Any, add_url_option: Callable[[argparse.ArgumentParser], None]) -> None:
    """``trioflow token ...`` in the command line's subcommands."""
    token = sub.add_parser(
        "token",
        help="create, list and revoke API tokens",
        description="API tokens, on the store directly (--store, also beside a running "
        "server) or through a server's API (--url with an admin --token). Token hashes "
        "are keyed with $TRIOFLOW_AUTH_SECRET when it is set: use the servers' value.",
        epilog=_EPILOG,
    )
    commands = token.add_subparsers(
        dest="token_command", required=True, metavar="ACTION", help="create, list, revoke, audit"
    )

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store",
            default=os.environ.get("TRIOFLOW_STORE"),
            metavar="URL",
            help="work on this store directly (sqlite:///PATH, postgresql://...; default: "
            "$TRIOFLOW_STORE); without it, through the server at --url",
        )
        add_url_option(p)

    p = commands.add_parser("create", help="create a token and print it (once)", epilog=_EPILOG)
    p.add_argument("--name", required=True, help="what the token is for (listed, audited)")
    p.add_argument("--role", required=True, choices=ROLES, help="viewer, runner or admin")
    p.add_argument(
        "--graphs",
        nargs="+",
        metavar="GLOB",
        help="graph ids the token covers: patterns with * and ? (default: * for all)",
    )
    p.add_argument("--expires", metavar="AGE", help="lifetime such as 12h, 90d (default: never)")
    where(p)
    p.set_defaults(func=cmd_token_create)

    p = commands.add_parser("list", help="list tokens (never their secrets)", epilog=_EPILOG)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    where(p)
    p.set_defaults(func=cmd_token_list)

    p = commands.add_parser(
        "revoke", help="revoke a token (servers refuse it within 2 s)", epilog=_EPILOG
    )
    p.add_argument("token_id", metavar="ID", help="the token's id (from token list)")
    where(p)
    p.set_defaults(func=cmd_token_revoke)

    p = commands.add_parser("audit", help="print the audit log", epilog=_EPILOG)
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after this seq")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N entries")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    where(p)
    p.set_defaults(func=cmd_token_audit)
