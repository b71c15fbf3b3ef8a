"""Access control: API tokens with a role and graph scopes, checked on every protected route.

A token is ``tf_<id>_<secret>``: ``id`` names it (16 hex digits, shown in
listings and the audit log) and ``secret`` is 32 random bytes (base64url).
The store keeps the id and a hash of the secret, never the secret: SHA-256,
or HMAC-SHA-256 keyed with the server's secret (the *pepper*) when one is
configured, so that a copy of the database alone cannot check a guess
against it. A hash of 256 random bits needs no slow hash: there is nothing
to guess. Comparisons are constant-time.

Roles, each including the one before: ``viewer`` (every read: state,
listings, logs, WebSocket and SSE, tools, graphs), ``runner`` (start,
cancel, resume and signal runs), ``admin`` (register graphs, prune, manage
tokens, read the audit log). Graph scopes are glob patterns over graph ids
(``team-a.*``); a run belongs to its graph. Whatever is outside a token's
scopes does not exist for it: 404, and listings leave it out in the store's
query (pages stay full, cursors stay valid).

:class:`Authority` is the one object that decides. It caches each token's
stored record for :data:`CACHE_S` seconds, so a revoked or expired token
stops working within that long on every node (the record is read again from
the store), and records when tokens were last used at the same pace. It
also holds the per-token rate buckets and stream counts, which are per
process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import trio
from starlette.requests import HTTPConnection

from trioflow import EngineError
from trioflow.stores.base import AuditEntry, Store, StoredToken, glob_any

from .errors import RequestError

log = logging.getLogger("trioflow.web")

Role = Literal["viewer", "runner", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "runner", "admin")
Access = Literal["public", "viewer", "runner", "admin"]
"""What a route needs: nothing (``public``), or a token of at least this role."""

AuthMode = Literal["auto", "on", "off"]
AUTH_MODES: tuple[AuthMode, ...] = ("auto", "on", "off")

#: How long a token's stored record (revocation, expiry) is trusted before it is read again.
CACHE_S = 2.0
#: Token records (and unknown ids) cached at most; beyond, the stale ones are dropped.
CACHE_MAX = 10_000
#: A stream ticket is good for this long, once.
TICKET_TTL_S = 30.0
#: The WebSocket subprotocol every client names, and the prefix that carries a token.
WS_PROTOCOL = "trioflow.v1"
WS_BEARER_PREFIX = "trioflow.bearer."

TOKEN_RE = re.compile(r"tf_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")
SCOPE_RE = re.compile(r"[A-Za-z0-9_.:*?-]{1,200}\Z")
GRAPH_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,200}\Z")
NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,100}\Z")

_RANK = {"public": 0, "viewer": 1, "runner": 2, "admin": 3}


def role_allows(role: str, needed: Access) -> bool:
    """Whether a token of ``role`` may use a route that needs ``needed``."""
    return _RANK.get(role, 0) >= _RANK[needed]


def check_scopes(patterns: Sequence[str]) -> tuple[str, ...]:
    """The patterns, validated: graph id characters, ``*`` and ``?``. Raises ValueError."""
    out = []
    for pattern in patterns:
        if not SCOPE_RE.match(pattern):
            raise ValueError(
                f"graph scope {pattern!r}: use graph id characters (A-Z a-z 0-9 _ . : -) "
                "with * and ? as wildcards, at most 200"
            )
        out.append(pattern)
    if not out:
        raise ValueError("a token needs at least one graph scope (* for every graph)")
    return tuple(dict.fromkeys(out))


PEPPER_ENV = "TRIOFLOW_AUTH_SECRET"


def auth_pepper() -> bytes | None:
    """The server secret token hashes are keyed with: ``$TRIOFLOW_AUTH_SECRET``, if set.

    Every node, and ``trioflow token create`` on the store, need the same one.
    Raises ValueError for a secret too short to key anything.
    """
    import os

    value = os.environ.get(PEPPER_ENV)
    if not value:
        return None
    if len(value) < 16:
        raise ValueError(f"${PEPPER_ENV} must be at least 16 characters")
    return value.encode()


def hash_secret(secret: str, pepper: bytes | None) -> str:
    """The stored form of a secret (hex)."""
    data = secret.encode()
    if pepper:
        return hmac.digest(pepper, data, "sha256").hex()
    return hashlib.sha256(data).hexdigest()


def new_secret() -> tuple[str, str]:
    """A fresh (token id, secret)."""
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return token_id, secret


def parse_token(text: str) -> tuple[str, str] | None:
    """``tf_<id>_<secret>`` -> (id, secret); None if it is not one."""
    match = TOKEN_RE.match(text)
    return (match.group(1), match.group(2)) if match else None


def make_token(
    name: str,
    role: str,
    graphs: Sequence[str] | None,
    *,
    pepper: bytes | None,
    now: float,
    expires_in: float | None = None,
) -> tuple[StoredToken, str]:
    """A new token record and its full text (shown once, stored nowhere). Raises ValueError."""
    if not NAME_RE.match(name):
        raise ValueError("a token name is 1 to 100 characters, without control characters")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    scopes = check_scopes(graphs if graphs is not None else ("*",))
    if expires_in is not None and not (0 < expires_in < 1e10):
        raise ValueError("a token's lifetime must be positive")
    token_id, secret = new_secret()
    record = StoredToken(
        token_id=token_id,
        name=name,
        role=role,
        graphs=scopes,
        secret_hash=hash_secret(secret, pepper),
        peppered=pepper is not None,
        created_at=now,
        expires_at=now + expires_in if expires_in is not None else None,
    )
    return record, f"tf_{token_id}_{secret}"


def token_view(token: StoredToken, now: float) -> dict[str, object]:
    """A token as listings show it: everything but the hash."""
    state = (
        "revoked"
        if token.revoked_at is not None
        else "expired"
        if token.expires_at is not None and now >= token.expires_at
        else "active"
    )
    return {
        "token_id": token.token_id,
        "name": token.name,
        "role": token.role,
        "graphs": list(token.graphs),
        "state": state,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "last_used_at": token.last_used_at,
    }


def principal_view(principal: Principal, auth_required: bool) -> dict[str, object]:
    """A principal as ``GET /auth/whoami`` (and ``POST /auth/session``) show it."""
    return {
        "auth_required": auth_required,
        "token_id": principal.token_id,
        "name": principal.name,
        "role": principal.role,
        "graphs": list(principal.graphs) if principal.graphs is not None else ["*"],
    }


def audit_view(entry: AuditEntry) -> dict[str, object]:
    """An audit entry as the API and the command line show it."""
    return {
        "seq": entry.seq,
        "ts": entry.ts,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "status": entry.status,
        "detail": entry.detail,
    }


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as. ``token_id`` None: access control is off (everything allowed)."""

    token_id: str | None
    name: str
    role: str
    graphs: tuple[str, ...] | None

    @staticmethod
    def of(token: StoredToken) -> Principal:
        graphs = None if "*" in token.graphs else token.graphs
        return Principal(token.token_id, token.name, token.role, graphs)

    def sees(self, graph_id: str) -> bool:
        """Whether the graph (and its runs) is inside this principal's scopes.

        An id outside the graph id alphabet (any id a client makes up) names
        no graph: it is checked first, and the match is linear in its length.
        """
        graphs = self.graphs
        if graphs is None:
            return True
        return GRAPH_ID_RE.match(graph_id) is not None and glob_any(graphs, graph_id)

    @property
    def actor(self) -> str:
        return self.token_id or "anonymous"


ANONYMOUS = Principal(None, "anonymous", "admin", None)
"""The principal of every request while access control is off."""


def principal_of(conn: HTTPConnection) -> Principal:
    """The principal the route's guard admitted (everyone, on a public route)."""
    principal = getattr(conn.state, "principal", None)
    return principal if isinstance(principal, Principal) else ANONYMOUS


def require_every_graph(
    principal: Principal, message: str = "this needs an admin token for every graph (scope *)"
) -> None:
    """403 for a token limited to some graphs: what it asks for spans them all."""
    if principal.graphs is not None:
        raise RequestError(403, "forbidden", message, {"graphs": list(principal.graphs)})


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Access control settings (see ``docs/api.md``, "Access control").

    Attributes:
        mode: ``auto`` requires tokens once any active token exists, and always
            when the server is bound to an address that is not loopback;
            ``on`` always; ``off`` never (refused on a non-loopback bind).
        pepper: the server secret the token hashes are keyed with (every
            node, and the command line creating tokens, need the same one).
        rate: requests per second a token may make on average, ``burst`` at once.
        run_rate: run starts per second a token may make, ``run_burst`` at once.
        max_streams: WebSocket and SSE followers a token may hold at once (per node).
        clock: the wall clock expiry is judged by (tests inject one).
    """

    mode: AuthMode = "auto"
    pepper: bytes | None = None
    rate: float = 50.0
    burst: int = 100
    run_rate: float = 10.0
    run_burst: int = 20
    max_streams: int = 32
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.mode not in AUTH_MODES:
            raise ValueError(f"unknown auth mode {self.mode!r}; use one of {AUTH_MODES}")
        if not (self.rate > 0 and self.run_rate > 0 and self.burst >= 1 and self.run_burst >= 1):
            raise ValueError("rates must be > 0 and bursts >= 1")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``size`` at once."""

    __slots__ = ("level", "rate", "size", "stamp")

    def __init__(self, rate: float, size: int, now: float) -> None:
        self.rate = rate
        self.size = float(size)
        self.level = float(size)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        self.level = min(self.size, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


def unauthorized(message: str, *, invalid: bool = True) -> RequestError:
    challenge = 'Bearer realm="trioflow"'
    if invalid:
        challenge += ', error="invalid_token"'
    return RequestError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


class Authority:
    """Authenticates credentials, authorises routes, limits rates, writes the audit log."""

    def __init__(self, store: Store, settings: AuthSettings, *, loopback: bool = True) -> None:
        self.store = store
        self.settings = settings
        self.loopback = loopback
        #: Token records by id, with the Trio time they were read (never the wall clock:
        #: a clock stepped back must not keep a revoked token alive).
        self._cache: dict[str, tuple[StoredToken, float]] = {}
        #: Ids the store does not know (any client can make these up): apart,
        #: so that filling this never pushes out a real token's record.
        self._unknown: dict[str, float] = {}
        self._principals: dict[str, Principal] = {}
        self._used: dict[str, float] = {}
        self._active_tokens: tuple[int, float] | None = None
        self._buckets: dict[tuple[str, bool], _Bucket] = {}
        self._streams: dict[str, int] = {}

    # -- mode ----------------------------------------------------------------------

    @property
    def store_keeps_tokens(self) -> bool:
        """False for a store class of an embedder's that has no token methods."""
        return type(self.store).count_tokens is not Store.count_tokens

    async def startup_problem(self) -> str | None:
        """Why the server must not start with these settings, or None."""
        mode = self.settings.mode
        if mode != "off" and not self.store_keeps_tokens:
            if mode == "on" or not self.loopback:
                return (
                    f"{type(self.store).__name__} keeps no API tokens: use --auth off on loopback"
                )
            return None
        if mode == "off":
            if not self.loopback:
                return (
                    "--auth off is refused on an address that is not loopback: anyone who "
                    "can reach the port could do everything"
                )
            return None
        if (mode == "on" or not self.loopback) and await self.store.count_tokens(
            active_at=self.settings.clock()
        ) == 0:
            why = "--auth on" if mode == "on" else "the server listens beyond loopback"
            return (
                f"{why}, so API tokens are required, and the store has no active one. "
                "Create one first: trioflow token create --store STORE_URL "
                "--name admin --role admin"
            )
        return None

    async def required(self, conn: HTTPConnection | None = None) -> bool:
        """Whether requests (``conn``'s) need a token now.

        In ``auto`` mode: always for a connection that arrived on an address
        that is not loopback (whatever the server was told it binds), and
        otherwise once any token has ever been created in the store, revoked
        and expired ones included: revoking the last token must not open the
        server again.
        """
        mode = self.settings.mode
        if mode == "off":
            return False
        if mode == "on" or not self.loopback:
            return True
        if conn is not None and not _arrived_on_loopback(conn):
            return True
        if not self.store_keeps_tokens:
            return False  # startup_problem refused this store everywhere but here
        now = trio.current_time()
        known = self._active_tokens
        if known is None or (known[0] == 0 and now - known[1] >= CACHE_S):
            count = await self.store.count_tokens()
            self._active_tokens = known = (count, now)
        return known[0] > 0

    def forget_count(self) -> None:
        """A token was created or revoked here: count again on the next request."""
        self._active_tokens = None

    # -- tokens ----------------------------------------------------------------------

    async def _record(self, token_id: str) -> StoredToken | None:
        now = trio.current_time()
        cached = self._cache.get(token_id)
        if cached is not None and now - cached[1] < CACHE_S:
            return cached[0]
        unknown = self._unknown.get(token_id)
        if unknown is not None and now - unknown < CACHE_S:
            return None
        token = await self.store.get_token(token_id)
        if token is None:
            if len(self._unknown) >= CACHE_MAX:
                self._unknown.clear()
            self._unknown[token_id] = now
            self._cache.pop(token_id, None)
            return None
        self._unknown.pop(token_id, None)
        if len(self._cache) >= CACHE_MAX and token_id not in self._cache:
            # More real tokens in use than the cache holds: drop the stale ones.
            for key in [k for k, (_, at) in self._cache.items() if now - at >= CACHE_S]:
                del self._cache[key]
        self._cache[token_id] = (token, now)
        used = self._used.pop(token_id, None)
        if used is not None and token is not None:
            await self.store.touch_tokens({token_id: used})
        return token

    def forget(self, token_id: str) -> None:
        self._cache.pop(token_id, None)

    async def still_valid(self, principal: Principal) -> None:
        """Return once the principal's token is revoked, expires or is gone (checked
        every :data:`CACHE_S`); never for anonymous access. Open streams watch this."""
        token_id = principal.token_id
        if token_id is None:
            await trio.sleep_forever()
            return
        while True:
            await trio.sleep(CACHE_S)
            token = await self._record(token_id)
            if token is None or not token.active(self.settings.clock()):
                return

    async def authenticate(self, text: str) -> Principal:
        """The principal of a token's text. Raises a 401 :class:`RequestError`."""
        parsed = parse_token(text)
        if parsed is None:
            raise unauthorized("the credential is not a trioflow token (tf_<id>_<secret>)")
        token_id, secret = parsed
        token = await self._record(token_id)
        pepper = self.settings.pepper
        if token is not None and token.peppered and pepper is None:
            raise unauthorized("the token was made with a server secret this server lacks")
        # The hash is computed whether or not the id exists: the answer's time
        # does not tell which ids exist.
        given = hash_secret(secret, pepper if token is None or token.peppered else None)
        if token is None or not hmac.compare_digest(given, token.secret_hash):
            raise unauthorized("unknown token or wrong secret")
        now = self.settings.clock()
        if token.revoked_at is not None:
            raise unauthorized("the token was revoked")
        if token.expires_at is not None and now >= token.expires_at:
            raise unauthorized("the token has expired")
        self._used[token_id] = now
        principal = self._principals.get(token_id)
        if principal is None or principal.role != token.role:
            if len(self._principals) >= CACHE_MAX:
                self._principals.clear()
            principal = self._principals[token_id] = Principal.of(token)
        return principal

    # -- requests ----------------------------------------------------------------------

    async def principal(self, conn: HTTPConnection, needed: Access, action: str) -> Principal:
        """Who ``conn`` acts as, if allowed ``needed``. Raises 401 or 403 RequestErrors.

        A refusal for a role too low goes to the audit log (``action``: what was asked).
        """
        if needed == "public" or not await self.required(conn):
            return ANONYMOUS
        text = bearer(conn)
        if text is None:
            raise unauthorized("this server requires an API token (Authorization: Bearer ...)")
        principal = await self.authenticate(text)
        # The rate first: refusals (and their audit entries) count against it too.
        self.limit(principal)
        if not role_allows(principal.role, needed):
            message = f"this needs the role {needed}; the token's role is {principal.role}"
            await self.audit(principal, action, conn.url.path, 403, message)
            raise RequestError(
                403, "forbidden", message, {"needed": needed, "role": principal.role}
            )
        return principal

    def limit(self, principal: Principal, *, run_start: bool = False) -> None:
        """Take from the principal's request (or run start) bucket. Raises a 429."""
        if principal.token_id is None:
            return
        s = self.settings
        key = (principal.token_id, run_start)
        now = trio.current_time()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= CACHE_MAX:
                self._buckets.clear()
            rate, size = (s.run_rate, s.run_burst) if run_start else (s.rate, s.burst)
            bucket = self._buckets[key] = _Bucket(rate, size, now)
        wait = bucket.take(now)
        if wait > 0:
            what = "run starts" if run_start else "requests"
            raise RequestError(
                429,
                "rate_limited",
                f"this token is over its rate of {what}; retry in {wait:.1f} s",
                {"retry_after_s": round(wait, 3)},
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    @contextmanager
    def stream(self, principal: Principal) -> Iterator[None]:
        """Count a follower of the principal's for as long as it is open. Raises a 429."""
        token_id = principal.token_id
        if token_id is None:
            yield
            return
        held = self._streams.get(token_id, 0)
        if held >= self.settings.max_streams:
            raise RequestError(
                429,
                "too_many_streams",
                f"this token already holds {held} log streams (the limit per token)",
                {"limit": self.settings.max_streams},
                headers={"Retry-After": "1"},
            )
        self._streams[token_id] = held + 1
        try:
            yield
        finally:
            left = self._streams[token_id] - 1
            if left:
                self._streams[token_id] = left
            else:
                del self._streams[token_id]

    # -- tickets ---------------------------------------------------------------------

    async def issue_ticket(self, principal: Principal) -> tuple[str, float]:
        """A single-use ticket for an EventSource of this principal's, and when it expires."""
        if principal.token_id is None:
            raise RequestError(
                400, "auth_off", "access control is off: streams need no ticket on this server"
            )
        ticket = "tft_" + secrets.token_urlsafe(32)
        now = self.settings.clock()
        expires = now + TICKET_TTL_S
        await self.store.put_ticket(_ticket_hash(ticket), principal.token_id, expires, now=now)
        return ticket, expires

    async def redeem_ticket(self, ticket: str) -> Principal:
        """The principal a ticket was issued to; the ticket is used up. Raises a 401."""
        if len(ticket) > 100:
            raise unauthorized("unknown or expired ticket")
        token_id = await self.store.take_ticket(_ticket_hash(ticket), self.settings.clock())
        if token_id is None:
            raise unauthorized("unknown or expired ticket")
        token = await self._record(token_id)
        if token is None or not token.active(self.settings.clock()):
            raise unauthorized("the ticket's token was revoked or has expired")
        principal = Principal.of(token)
        self.limit(principal)
        return principal

    # -- audit -------------------------------------------------------------------------

    async def audit(
        self, principal: Principal, action: str, target: str, status: int, detail: str = ""
    ) -> None:
        """Append an audit entry. Never fails the request it describes: an entry the
        store cannot take (it is down, or keeps no audit log) goes to the server log."""
        entry = AuditEntry(
            0, self.settings.clock(), principal.actor, action, target[:300], status, detail[:500]
        )
        if self.store_keeps_tokens:
            try:
                await self.store.add_audit([entry])
                return
            except EngineError as exc:
                log.warning("audit entry not stored (%s): %s", exc.message, entry)
                return
        log.info("audit: %s", entry)


def _arrived_on_loopback(conn: HTTPConnection) -> bool:
    """Whether the connection came in on a loopback address of this machine."""
    import ipaddress

    server = conn.scope.get("server")
    if not server or not server[0]:
        return True  # a Unix socket, or a test transport: no network address
    try:
        return ipaddress.ip_address(str(server[0]).strip("[]")).is_loopback
    except ValueError:
        return False


def _ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


SESSION_COOKIE = "trioflow_session"
"""The cookie a browser's session keeps its token in (``POST /auth/session``)."""


def bearer(conn: HTTPConnection) -> str | None:
    """The token a request or WebSocket handshake carries, if any.

    ``Authorization: Bearer <token>``; on a WebSocket also the subprotocol
    ``trioflow.bearer.<token>`` (browsers cannot set headers on one); else
    the session cookie of a browser logged in at ``/ui/login`` (``HttpOnly``
    and ``SameSite=Strict``: no other site's page sends it, and the request
    guard refuses other origins and non-JSON bodies). Never the query
    string, which ends up in logs.
    """
    header = conn.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""
    if conn.scope["type"] == "websocket":
        for protocol in conn.scope.get("subprotocols") or ():
            if protocol.startswith(WS_BEARER_PREFIX):
                return str(protocol[len(WS_BEARER_PREFIX) :])
    cookie = conn.cookies.get(SESSION_COOKIE)
    return cookie or None
