"""Job inputs and results in a local folder and in S3 (a real S3-compatible server, over HTTP)."""
from __future__ import annotations

import boto3
import httpx
import pytest

from servers import s3_server
from serve_app.jobs.objects import FolderStore, S3Store


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="results")
        yield endpoint


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return FolderStore(tmp_path / "objects")
    return S3Store("results", prefix=f"{tmp_path.name}/", endpoint_url=request.getfixturevalue("s3_endpoint"))


def test_put_get_and_delete(store):
    store.put("results/job_1.png", b"\x89PNG...", "image/png")
    store.put("inputs/job_1", b"raw", "application/octet-stream")
    assert store.get("results/job_1.png") == b"\x89PNG..."
    store.put("results/job_1.png", b"replaced", "image/png")  # a put replaces whole
    assert store.get("results/job_1.png") == b"replaced"
    store.delete(["results/job_1.png", "inputs/job_1", "never/was"])
    for key in ("results/job_1.png", "inputs/job_1"):
        with pytest.raises(KeyError):
            store.get(key)


def test_s3_results_are_handed_out_as_presigned_urls(store):
    store.put("results/job_2.webp", b"RIFF....WEBP", "image/webp")
    url = store.url("results/job_2.webp", expires_s=60)
    if isinstance(store, FolderStore):
        assert url is None  # served by the ingress itself
        return
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"RIFF....WEBP"
    assert answer.headers["content-type"] == "image/webp"
    assert httpx.get(url.split("?")[0]).status_code == 403  # not without the signature


def test_a_folder_key_cannot_leave_the_folder(tmp_path):
    store = FolderStore(tmp_path / "objects")
    for key in ("../outside", "results/../../outside", "/etc/passwd"):
        with pytest.raises(ValueError):
            store.put(key, b"x", "text/plain")
    assert not (tmp_path / "outside").exists()
