"""Job records on a SQLite file and on a real PostgreSQL server: atomic, fenced state changes."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from servers import postgres
from serve_app.jobs.records import JobRecords


@pytest.fixture(scope="module")
def postgres_url():
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    jobs = JobRecords(url, retention_s=3600)
    yield jobs
    if request.param == "postgresql":  # one server for the module: each test starts from no jobs
        jobs.delete([job.id for job in jobs.page(limit=10_000)[0]])
    jobs.close()


OPTIONS = {"model": "RealESRGAN_x4plus", "scale": 4.0}
OUTPUT = {"key": "results/x.png", "format": "png", "bytes": 10, "width": 4, "height": 4, "faces": 0}


def test_a_job_is_created_queued_and_an_idempotency_key_gives_it_back(records):
    job, created = records.create(options=OPTIONS, input_key="inputs/a", idempotency_key="k-1")
    assert created and job.status == "queued" and job.attempt == 0 and job.options == OPTIONS
    assert job.created_at == job.updated_at and job.created_at.tzinfo is not None
    assert (job.expires_at - job.created_at).total_seconds() == pytest.approx(3600)
    again, created = records.create(options={"other": 1}, input_key="inputs/b", idempotency_key="k-1")
    assert not created and again == job
    other, created = records.create(options=OPTIONS, image_url="https://example.com/a.png")
    assert created and other.id != job.id and records.get(other.id).image_url == "https://example.com/a.png"
    assert records.get("job_missing") is None


def test_a_job_finishes_once_and_a_redelivery_of_a_finished_job_does_nothing(records):
    job, _ = records.create(options=OPTIONS)
    attempt = records.start(job.id)
    started = records.get(job.id)
    assert attempt == 1 and started.status == "processing" and started.started_at is not None
    assert records.succeed(job.id, attempt, OUTPUT)
    # The consumer died before acknowledging: the broker hands the job out again.
    assert records.start(job.id) is None
    assert not records.succeed(job.id, attempt, {**OUTPUT, "key": "results/second.png"})
    done = records.get(job.id)
    assert done.status == "succeeded" and done.output == OUTPUT and done.completed_at >= done.started_at


def test_a_consumer_that_lost_its_job_to_a_redelivery_cannot_record_an_outcome(records):
    job, _ = records.create(options=OPTIONS)
    first = records.start(job.id)
    second = records.start(job.id)  # its consumer was presumed dead; it was only slow
    assert (first, second) == (1, 2)
    assert not records.succeed(job.id, first, OUTPUT) and not records.fail(job.id, first, "x", "y")
    assert records.fail(job.id, second, "corrupt_image", "the data ends early")
    assert records.get(job.id).error == {"code": "corrupt_image", "detail": "the data ends early"}


def test_cancelling_a_queued_job_and_a_running_one(records):
    queued, _ = records.create(options=OPTIONS)
    assert records.cancel(queued.id).status == "canceled"
    assert records.start(queued.id) is None  # it never runs
    running, _ = records.create(options=OPTIONS)
    attempt = records.start(running.id)
    assert records.cancel(running.id).status == "canceled"
    assert not records.succeed(running.id, attempt, OUTPUT)  # its result is discarded
    assert records.get(running.id).output is None
    assert records.cancel(running.id).status == "canceled" and records.cancel("job_missing") is None


def test_a_job_refused_before_it_starts_fails_at_once(records):
    job, _ = records.create(options=OPTIONS, image_url="http://169.254.169.254/latest")
    assert records.fail(job.id, None, "url_refused", "a link-local address")
    assert records.get(job.id).status == "failed" and records.start(job.id) is None


def test_racing_consumers_get_distinct_attempts_and_one_outcome(records):
    job, _ = records.create(options=OPTIONS)
    with ThreadPoolExecutor(8) as pool:
        attempts = list(pool.map(lambda _: records.start(job.id), range(8)))
    assert sorted(attempts) == list(range(1, 9))
    with ThreadPoolExecutor(8) as pool:
        recorded = list(pool.map(lambda a: records.succeed(job.id, a, {**OUTPUT, "key": f"r{a}"}), attempts))
    assert recorded.count(True) == 1 and records.get(job.id).output["key"] == "r8"  # only the last attempt's


def test_pages_newest_first_with_a_status_filter_and_a_cursor(records):
    ids = []
    for _ in range(5):
        ids.append(records.create(options=OPTIONS)[0].id)
        time.sleep(0.002)
    records.cancel(ids[1])
    first, cursor = records.page(limit=2)
    assert [j.id for j in first] == [ids[4], ids[3]] and cursor == ids[3]
    rest, end = records.page(limit=10, cursor=cursor)
    assert [j.id for j in rest] == [ids[2], ids[1], ids[0]] and end is None
    canceled, _ = records.page(status="canceled")
    assert [j.id for j in canceled] == [ids[1]]
    with pytest.raises(KeyError):
        records.page(cursor="job_missing")


def test_records_expire_after_the_retention(records):
    job, _ = records.create(options=OPTIONS)
    assert records.expired() == []
    later = job.expires_at
    assert [j.id for j in records.expired(later)] == [job.id]
    assert records.delete([job.id]) == 1 and records.get(job.id) is None


def test_replicas_opening_a_new_database_at_once_all_get_the_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with ThreadPoolExecutor(4) as pool:  # every ingress and consumer replica creates it at start
        opened = list(pool.map(lambda _: JobRecords(url), range(4)))
    job, _ = opened[0].create(options=OPTIONS)
    assert all(records.get(job.id) == job for records in opened)
    for records in opened:
        records.close()


def test_a_page_holds_only_its_owners_jobs_and_an_older_table_gains_the_column(records, tmp_path):
    mine = [records.create(options=OPTIONS, owner="alice")[0].id for _ in range(3)]
    theirs = records.create(options=OPTIONS, owner="bob")[0].id
    assert [job.id for job in records.page(owner="alice")[0]] == mine[::-1]
    assert records.get(theirs).owner == "bob" and len(records.page()[0]) == 4  # no owner given: all
    first, cursor = records.page(owner="alice", limit=2)
    assert [job.id for job in first] + [job.id for job in records.page(owner="alice", cursor=cursor)[0]] == mine[::-1]
    if records.engine.dialect.name != "sqlite":
        return
    # a database made before jobs had owners: opening it adds the column, and its jobs stay
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        schema = records.engine.raw_connection().execute("SELECT sql FROM sqlite_master WHERE name='jobs'").fetchone()[0]
        db.execute(schema.replace("owner VARCHAR(64),", "").replace(", \n\towner VARCHAR(64)", ""))
        db.execute("INSERT INTO jobs (id, status, created_at, updated_at, expires_at, attempt, options) "
                   "VALUES ('job_old', 'queued', '2026-01-01', '2026-01-01', '2027-01-01', 0, '{}')")
    assert "owner" not in sqlite3.connect(path).execute("SELECT sql FROM sqlite_master WHERE name='jobs'").fetchone()[0]
    reopened = JobRecords(f"sqlite:///{path}")
    assert reopened.get("job_old").owner is None and reopened.create(options=OPTIONS, owner="alice")[1]
    reopened.close()
