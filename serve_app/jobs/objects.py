"""Where job inputs and results live: a local folder by default, S3 (or any S3-compatible
server) when configured. One small interface, so the consumers and the ingress never care."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when there is none."""

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        """A large object (a video) from a file, never whole in memory."""

    def get_file(self, key: str, path: Path) -> None:
        """The object into the file at ``path``; KeyError when there is none."""

    def url(self, key: str, expires_s: int) -> str | None:
        """A URL a client can fetch the object from for ``expires_s``, or None (served by us)."""

    def delete(self, keys: list[str]) -> None: ...


class FolderStore:
    """Objects as files under ``root``; a put is atomic (written aside, then renamed)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, aside = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(aside, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        aside = target.with_name(f".put-{target.name}")
        shutil.copyfile(path, aside)
        os.replace(aside, target)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise KeyError(key) from None

    def url(self, key: str, expires_s: int) -> str | None:
        return None

    def file(self, key: str) -> Path:
        """Where the object lies, for sending it as it is read (a video result)."""
        return self._path(key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


class S3Store:
    """Objects in an S3 bucket under ``prefix``, through boto3 (credentials from its usual chain:
    the instance role on EC2); results are handed out as presigned URLs."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        # boto3's transfer manager: multipart above 8 MB, parts read from the file as they go
        self.client.upload_file(str(path), self.bucket, self.prefix + key, ExtraArgs={"ContentType": content_type})

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self.prefix + key, str(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise KeyError(key) from None
            raise

    def url(self, key: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key},
                                                  ExpiresIn=expires_s)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a call
            chunk = [{"Key": self.prefix + key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
