"""Job records: one row per job, in a SQLite file by default or PostgreSQL by URL (SQLAlchemy 2).

A job moves ``queued -> processing -> succeeded | failed``, or to ``canceled`` from either of
the first two. Every move is one conditional UPDATE, so the database itself decides races:
- ``start`` takes a queued job, or one still marked processing whose consumer died (the broker
  delivers it again), and gives it a new ``attempt`` number;
- ``finish`` records an outcome only for the attempt that is still current and still
  processing: a consumer that lost its job to a redelivery, or whose job was cancelled, finds
  zero rows changed and discards its result. A job delivered twice is recorded done once.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import (
    JSON, DateTime, Integer, String, Text, create_engine, delete, event, func, inspect, select, text, update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

STATUSES = ("queued", "processing", "succeeded", "failed", "canceled")
FINAL = ("succeeded", "failed", "canceled")


class _Base(DeclarativeBase):
    pass


class _Job(_Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    options: Mapped[dict] = mapped_column(JSON)
    input_key: Mapped[str | None] = mapped_column(String(255))  # the upload, in the object store
    image_url: Mapped[str | None] = mapped_column(Text)
    webhook: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict | None] = mapped_column(JSON)  # key, format, bytes, width, height, faces
    error: Mapped[dict | None] = mapped_column(JSON)  # code, detail: the synchronous path's
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # the API key's name that submitted it
    progress: Mapped[dict | None] = mapped_column(JSON)  # a video's frames done, total, fps, time left


@dataclass(frozen=True)
class JobRecord:
    """A job as read from the database (a snapshot: the row may change after)."""

    id: str
    status: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime
    attempt: int
    idempotency_key: str | None
    options: dict
    input_key: str | None
    image_url: str | None
    webhook: str | None
    output: dict | None
    error: dict | None
    owner: str | None
    progress: dict | None

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _utc(value: datetime | None) -> datetime | None:
    # SQLite keeps no zone: every time stored here is UTC.
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)


def _record(row: _Job) -> JobRecord:
    values = {name: getattr(row, name) for name in JobRecord.__dataclass_fields__}
    for name in ("created_at", "updated_at", "started_at", "completed_at", "expires_at"):
        values[name] = _utc(values[name])
    return JobRecord(**values)


def new_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def now() -> datetime:
    return datetime.now(timezone.utc)


class JobRecords:
    """The jobs table behind ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""

    def __init__(self, url: str, *, retention_s: float = 24 * 3600):
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, pool_pre_ping=not sqlite,
                                    connect_args={"timeout": 30} if sqlite else {})
        if sqlite:
            # WAL lets readers run beside the one writer; each connection waits for the lock
            # rather than failing at once.
            @event.listens_for(self.engine, "connect")
            def _pragmas(connection, _):
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()
        self.retention = timedelta(seconds=retention_s)
        try:
            _Base.metadata.create_all(self.engine)
        except DBAPIError:  # every replica creates the table at start: another one won the race
            _Base.metadata.create_all(self.engine)
        self._add_columns({"owner": "VARCHAR(64)", "progress": "JSON"})

    def _add_columns(self, columns: dict[str, str]) -> None:
        """A table made before a column existed gets it, empty (an owner-less job only admins see)."""
        have = {column["name"] for column in inspect(self.engine).get_columns("jobs")}
        for name, kind in columns.items():
            if name in have:
                continue
            try:
                with self.engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))
            except DBAPIError:  # another replica added it meanwhile
                pass

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ submit and read
    def create(self, *, options: dict, job_id: str | None = None, input_key: str | None = None,
               image_url: str | None = None, webhook: str | None = None,
               idempotency_key: str | None = None, owner: str | None = None) -> tuple[JobRecord, bool]:
        """A new queued job, or (``created`` False) the one already made with ``idempotency_key``."""
        at = now()
        row = _Job(id=job_id or new_id(), status="queued", created_at=at, updated_at=at,
                   expires_at=at + self.retention, attempt=0, idempotency_key=idempotency_key,
                   options=options, input_key=input_key, image_url=image_url, webhook=webhook, owner=owner)
        job_id = row.id  # the row is expired once its session commits
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
            return self.get(job_id), True
        except IntegrityError:
            if idempotency_key is None:
                raise
            with Session(self.engine) as session:
                existing = session.scalars(select(_Job).where(_Job.idempotency_key == idempotency_key)).one()
                return _record(existing), False

    def get(self, job_id: str) -> JobRecord | None:
        with Session(self.engine) as session:
            row = session.get(_Job, job_id)
            return None if row is None else _record(row)

    def page(self, *, status: str | None = None, cursor: str | None = None, limit: int = 50,
             owner: str | None = None) -> tuple[list[JobRecord], str | None]:
        """Newest first (``owner``'s only, when given); ``cursor`` is the last id of the previous page."""
        query = select(_Job).order_by(_Job.created_at.desc(), _Job.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(_Job.status == status)
        if owner is not None:
            query = query.where(_Job.owner == owner)
        with Session(self.engine) as session:
            if cursor is not None:
                last = session.get(_Job, cursor)
                if last is None:
                    raise KeyError(cursor)
                query = query.where((_Job.created_at < last.created_at)
                                    | ((_Job.created_at == last.created_at) & (_Job.id < last.id)))
            rows = [_record(row) for row in session.scalars(query)]
        more = len(rows) > limit
        return rows[:limit], rows[limit - 1].id if more else None

    # ------------------------------------------------------------------ state changes
    def _change(self, job_id: str, where, **values) -> bool:
        with Session(self.engine) as session, session.begin():
            result = session.execute(update(_Job).where(_Job.id == job_id, where)
                                     .values(updated_at=now(), **values))
            return result.rowcount == 1

    def start(self, job_id: str) -> int | None:
        """The new attempt number of a job now processing, or None: it ended or was cancelled
        meanwhile (a redelivery of a finished job), so there is nothing to do. One UPDATE, so
        racing consumers get distinct attempts on SQLite as on PostgreSQL."""
        at = now()
        with Session(self.engine) as session, session.begin():
            return session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_(("queued", "processing")))
                .values(status="processing", attempt=_Job.attempt + 1, updated_at=at,
                        started_at=func.coalesce(_Job.started_at, at))
                .returning(_Job.attempt)).scalar_one_or_none()

    def succeed(self, job_id: str, attempt: int, output: dict) -> bool:
        """Record the result of ``attempt``; False: that attempt is no longer the job's."""
        return self._change(job_id, (_Job.status == "processing") & (_Job.attempt == attempt),
                            status="succeeded", completed_at=now(), output=output)

    def report(self, job_id: str, attempt: int, progress: dict) -> bool:
        """Record how far ``attempt`` got; False: the job was cancelled or is no longer this attempt's."""
        return self._change(job_id, (_Job.status == "processing") & (_Job.attempt == attempt), progress=progress)

    def fail(self, job_id: str, attempt: int | None, code: str, detail: str) -> bool:
        """Record a failure of ``attempt`` (None: the job failed before it ever started, e.g.
        its URL was refused at submit)."""
        where = (_Job.status == "queued") if attempt is None else \
            (_Job.status == "processing") & (_Job.attempt == attempt)
        return self._change(job_id, where, status="failed", completed_at=now(),
                            error={"code": code, "detail": detail})

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job that has not ended; the job as it stands after (None: no such job)."""
        self._change(job_id, _Job.status.in_(("queued", "processing")), status="canceled", completed_at=now())
        return self.get(job_id)

    # ------------------------------------------------------------------ retention
    def expired(self, at: datetime | None = None, limit: int = 500) -> list[JobRecord]:
        with Session(self.engine) as session:
            query = select(_Job).where(_Job.expires_at <= (at or now())).limit(limit)
            return [_record(row) for row in session.scalars(query)]

    def delete(self, job_ids: list[str]) -> int:
        if not job_ids:
            return 0
        with Session(self.engine) as session, session.begin():
            return session.execute(delete(_Job).where(_Job.id.in_(job_ids))).rowcount
