"""`Idempotency-Key` on every POST of a service: the first answer is kept beside the writes and replayed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import AuthError, JWTVerifier, Principal
from shared.store import (
    UNAVAILABLE_ERRORS,
    BeforeCommit,
    EventStore,
    as_utc,
    before_commit,
    database_unavailable,
    utcnow,
)
from shared.web import PROBLEM_JSON, Problem, database_unavailable_problem, problem_response

log = logging.getLogger(__name__)

KEY_HEADER = b"idempotency-key"
REPLAYED_HEADER = b"idempotent-replayed"
KEY_TTL = timedelta(hours=24)
# Printable ASCII without spaces: UUIDs, ULIDs and the like; nothing that could smuggle headers.
_SAFE_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_KEPT_HEADERS = frozenset({b"content-type", b"location", b"retry-after"})
OUTCOME_UNKNOWN = Problem(
    409, "idempotency_key_outcome_unknown",
    "The first request with this Idempotency-Key was written, but its answer was lost",
    "Read the resource to see what it recorded; do not send the request again under a new key")

idempotency_keys = sa.Table(
    "idempotency_keys",
    sa.MetaData(),
    sa.Column("principal", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=True),
    sa.Column("headers", sa.JSON, nullable=True),
    sa.Column("body", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    # Set in the transaction that commits the first request's events: never released after that.
    sa.Column("written_at", sa.DateTime(timezone=True), nullable=True),
    # The process running the first request (`Runtime.instance_id`, D57); None: an older row.
    sa.Column("owner", sa.String(64), nullable=True),
)


_CLAIM_ATTEMPTS = 5


def taken_over() -> Problem:
    """What a request whose key another replica took over meanwhile answers: its events did
    not commit, and the retry that took the key over runs (or ran) the request."""
    return Problem(409, "idempotency_key_taken_over", "A retry with this Idempotency-Key took "
                   "the request over; this attempt wrote nothing",
                   "Its answer is the retry's: send the request again with the key to get it")


class _LostRace(Exception):
    """Another request with the same key changed its row between this one's read and write."""


def request_hash(method: str, path: str, query: bytes, body: bytes) -> str:
    """What makes two requests "the same": method, path, query string and the exact body bytes."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredAnswer:
    request_hash: str
    status: int | None  # None: the first request is still running (or died)
    headers: list[list[str]]
    body: bytes
    written: bool = False  # the first request's events committed
    abandoned: bool = False  # no answer, and its process died (D57) or the lease has run out


class IdempotencyRecords:
    """The service's table of keys, beside its events. Each call is one short transaction of its
    own; the table's primary key settles a race: of two concurrent duplicates, one inserts the
    key and the other's insert fails, so it reads the first one's row instead (D18)."""

    def __init__(self, store: EventStore, lease: timedelta = timedelta(minutes=5),
                 owner: str | None = None,
                 alive: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.store = store
        self.lease = lease
        self.owner = owner  # this process, written on the keys it claims
        self.alive = alive  # whether the process that claimed a key still runs (D57)
        self.claimed_at: datetime | None = None  # this request's claim (`give_up` is of it only)

    async def claim(self, principal: str, key: str, digest: str) -> StoredAnswer | None:
        """None: the caller owns the key now and must run the request. Else what is stored."""
        for _ in range(_CLAIM_ATTEMPTS - 1):
            try:
                return await self._claim(principal, key, digest)
            except (IntegrityError, _LostRace):
                continue  # another request with this key got there first: read its row
        return await self._claim(principal, key, digest)

    async def _claim(self, principal: str, key: str, digest: str) -> StoredAnswer | None:
        t = idempotency_keys
        where = sa.and_(t.c.principal == principal, t.c.key == key)
        async with self.store.engine.begin() as conn:
            row = (await conn.execute(sa.select(t).where(where))).first()
            if row is not None and as_utc(row.created_at) < utcnow() - KEY_TTL:
                await conn.execute(t.delete().where(where, t.c.created_at == row.created_at))
                row = None
            if row is None:
                self.claimed_at = utcnow()
                await conn.execute(t.insert().values(
                    principal=principal, key=key, request_hash=digest, created_at=self.claimed_at,
                    owner=self.owner))
                return None
            died = row.status is None and (as_utc(row.created_at) < utcnow() - self.lease
                                           or await self._owner_died(row.owner))
            if row.status is None and row.written_at is None and row.request_hash == digest \
                    and died:
                # The first attempt wrote nothing and never answered: its process died. Running
                # the request again cannot repeat a write, so this retry takes the key over,
                # unless another retry took it over first (then the row has moved on).
                self.claimed_at = utcnow()
                taken = await conn.execute(t.update().where(
                    where, t.c.created_at == row.created_at, t.c.written_at.is_(None),
                    t.c.status.is_(None)).values(created_at=self.claimed_at, owner=self.owner))
                if taken.rowcount != 1:
                    raise _LostRace
                return None
        return StoredAnswer(row.request_hash, row.status, list(row.headers or []),
                            bytes(row.body or b""), row.written_at is not None, died)

    async def _owner_died(self, owner: str | None) -> bool:
        """Whether the process that claimed a key is gone (killed, crashed: its instance lock
        went with it), so the key need not wait out its lease. An older row names no owner."""
        if owner is None or owner == self.owner or self.alive is None:
            return False
        return not await self.alive(owner)

    def mark_written(self, principal: str, key: str) -> BeforeCommit:
        """Run inside the transaction that commits the request's events (`before_commit`)."""
        t = idempotency_keys

        async def mark(conn: AsyncConnection) -> None:
            # Fenced by this request's claim: a key another replica took over (this process's
            # instance lock was lost with its connection while it ran: the other took it for
            # dead) is no longer this request's to write under, and its events do not commit.
            marked = await conn.execute(t.update().where(*self._ours(principal, key))
                                        .values(written_at=utcnow()))
            if marked.rowcount != 1:
                raise taken_over()

        return mark

    def _ours(self, principal: str, key: str) -> tuple[sa.ColumnElement[bool], ...]:
        """The key's row while this request's claim holds it."""
        t = idempotency_keys
        mine = (t.c.principal == principal, t.c.key == key)
        return mine if self.claimed_at is None else (*mine, t.c.created_at == self.claimed_at)

    async def complete(self, principal: str, key: str, status: int,
                       headers: list[list[str]], body: bytes) -> None:
        t = idempotency_keys
        async with self.store.engine.begin() as conn:  # never over another claim's answer
            await conn.execute(t.update().where(*self._ours(principal, key))
                               .values(status=status, headers=headers, body=body,
                                       completed_at=utcnow()))

    async def give_up(self, principal: str, key: str) -> None:
        """The request failed on our side (5xx, an exception). If it wrote nothing, the key is
        released so that a retry runs it again; if it wrote, a retry must never write a second
        time, so the key's answer becomes 409 `idempotency_key_outcome_unknown`."""
        t = idempotency_keys
        # Only this request's own claim: given up late (the database was down, D54), a retry
        # may have claimed the key since, and its claim is not this one's to drop.
        where = sa.and_(*self._ours(principal, key))
        async with self.store.engine.begin() as conn:
            await conn.execute(t.delete().where(where, t.c.written_at.is_(None)))
            await conn.execute(t.update().where(where, t.c.status.is_(None)).values(
                status=OUTCOME_UNKNOWN.status, headers=[["content-type", PROBLEM_JSON]],
                body=json.dumps(OUTCOME_UNKNOWN.body()).encode(), completed_at=utcnow()))


def _principal(headers: dict[bytes, bytes], verifier: JWTVerifier) -> Principal | None:
    try:
        return verifier.principal(headers.get(b"authorization", b"").decode("latin-1"))
    except AuthError:
        return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client went away first (or the body limit cut it off)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class IdempotencyMiddleware:
    """For a POST with `Idempotency-Key` from a verified principal: run it once, replay after.

    Keys are per principal (one caller cannot see another's answers). The same key with another
    request gets 422 `idempotency_key_reused`; a duplicate arriving while the first still runs
    gets 409 `idempotency_key_in_progress`, so the two never both execute. Answers below 500 are
    kept (a refusal is an answer too); a 5xx releases the key so that a retry can run, unless the
    request wrote (the transaction that commits its events also marks the key written): then the
    key's answer is 409 `idempotency_key_outcome_unknown`, never a second run. A key left without
    an answer by a process that died is settled as soon as a retry finds that process gone (its
    instance lock went with it, D57), else once its lease (`TRIAL_IDEMPOTENCY_LEASE_S`) has run
    out: outcome unknown if it wrote, run again if it did not; before that, in progress (D25).
    Requests without a valid token pass through untouched, and the endpoint answers 401.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw_key = headers.get(KEY_HEADER)
        runtime = getattr(scope["app"].state, "runtime", None)
        who = _principal(headers, runtime.verifier) if runtime and raw_key is not None else None
        if raw_key is None or runtime is None or who is None:
            await self.app(scope, receive, send)
            return
        key = raw_key.decode("latin-1")
        if not _SAFE_KEY.fullmatch(key):
            await problem_response(Problem(
                400, "invalid_idempotency_key", "Idempotency-Key is not valid",
                "1 to 255 printable ASCII characters, no spaces"))(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # nobody to answer, and a cut-off request must not use up its key
        digest = request_hash("POST", scope["path"], scope.get("query_string", b""), body)
        records = IdempotencyRecords(runtime.store,
                                     timedelta(seconds=runtime.settings.idempotency_lease_s),
                                     owner=runtime.instance_id, alive=runtime.instance_alive)
        try:
            stored = await records.claim(who.sub, key, digest)
        except UNAVAILABLE_ERRORS as exc:
            if not database_unavailable(exc):
                raise
            problem = database_unavailable_problem()  # nothing claimed: the retry runs it
            await problem_response(problem, problem.headers)(scope, receive, send)
            return
        if stored is not None:
            await self._answer_again(stored, digest, scope, receive, send)
            return
        await self._run_first(records, who.sub, key, body, scope, receive, send)

    async def _answer_again(self, stored: StoredAnswer, digest: str, scope: Scope,
                            receive: Receive, send: Send) -> None:
        if stored.request_hash != digest:
            problem = Problem(422, "idempotency_key_reused", "Idempotency-Key was used for "
                              "another request", "Use a new key for a different request")
            await problem_response(problem)(scope, receive, send)
        elif stored.status is None and stored.abandoned:  # it wrote: else claim() took it over
            await problem_response(OUTCOME_UNKNOWN)(scope, receive, send)
        elif stored.status is None:
            problem = Problem(409, "idempotency_key_in_progress",
                              "The first request with this Idempotency-Key is still running")
            await problem_response(problem, {"Retry-After": "1"})(scope, receive, send)
        else:
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers]
            headers.append((REPLAYED_HEADER, b"true"))
            await send({"type": "http.response.start", "status": stored.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": stored.body})

    async def _run_first(self, records: IdempotencyRecords, principal: str, key: str,
                         body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        delivered = False

        async def replay_body() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        answer: dict[str, Any] = {"status": 500, "headers": [], "body": [], "settled": False}
        held: list[Message] = []

        async def settle() -> None:
            """Store the answer (a 5xx: release the key) before the caller hears any of it: a
            retry sent the moment the answer arrives must find the key settled, never in
            progress (a 503 with Retry-After is made to be retried at once)."""
            answer["settled"] = True
            if answer["status"] >= 500:
                await _quietly_give_up(records, principal, key)
            else:
                await _quietly_complete(records, principal, key, answer["status"],
                                        answer["headers"], b"".join(answer["body"]))

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = [[k.decode("latin-1"), v.decode("latin-1")]
                                     for k, v in message.get("headers", [])
                                     if k.lower() in _KEPT_HEADERS]
                held.append(message)
            elif message["type"] == "http.response.body":
                answer["body"].append(message.get("body", b""))
                held.append(message)
                if not message.get("more_body", False):  # the whole answer: settle, then send
                    await settle()
                    for kept in held:
                        await send(kept)
                    held.clear()
            else:
                await send(message)

        hooks = before_commit.set((*before_commit.get(), records.mark_written(principal, key)))
        try:
            await self.app(scope, replay_body, capture)
        except BaseException:
            await _quietly_give_up(records, principal, key)
            raise
        finally:
            before_commit.reset(hooks)
        if not answer["settled"]:  # no complete answer went out
            await settle()
            for kept in held:
                await send(kept)


async def _quietly_give_up(records: IdempotencyRecords, principal: str, key: str) -> None:
    await _settle_or_later(lambda: records.give_up(principal, key), records, "give up")


async def _quietly_complete(records: IdempotencyRecords, principal: str, key: str, status: int,
                            headers: list[list[str]], body: bytes) -> None:
    """Keep the answer; if the database went away since the request's own commit (the answer
    waits for the broker, D56), the answer still goes out (it is true: the request's writes are
    committed) and is kept when the database is back. Meanwhile a retry finds the key written
    and in progress, never a second run."""
    await _settle_or_later(lambda: records.complete(principal, key, status, headers, body),
                           records, "keep the answer of")


async def _settle_or_later(settle: Callable[[], Awaitable[None]], records: IdempotencyRecords,
                           what: str) -> None:
    try:
        await settle()
    except Exception as exc:  # settle the key when we can, in the background
        log.warning("could not %s an idempotency key (trying again in the background): %r",
                    what, exc)
        task = asyncio.create_task(_settle_later(settle, records, what))
        _settling.add(task)
        task.add_done_callback(_settling.discard)


_settling: set[asyncio.Task[None]] = set()  # keys being settled in the background (strong refs)


async def _settle_later(settle: Callable[[], Awaitable[None]], records: IdempotencyRecords,
                        what: str) -> None:
    """Settle the key once the database answers again (it was down when the request ended), so
    the caller's retry with the same key gets its answer (or runs, for a key given up) at once
    instead of meeting 409 `idempotency_key_in_progress` until the lease runs out (issue 15:
    retries with the same key succeed after a database restart). Within the lease only: past
    it, `claim` settles the key itself."""
    deadline = asyncio.get_running_loop().time() + records.lease.total_seconds()
    pause = 0.2
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(pause)
        try:
            await settle()
            return
        except Exception as exc:
            if not database_unavailable(exc):
                log.warning("could not %s an idempotency key: %r", what, exc)
                return
        pause = min(pause * 2, 2.0)
