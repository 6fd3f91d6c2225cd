"""Run storage: a local folder (a `pathlib.Path`) or a URI that `pyarrow.fs` opens (`s3://`, `gs://`, ...).

`location(text)` gives a Path for a local path and a `RemotePath` for a URI. RemotePath has the few pathlib
methods oodlab uses on its storage (`/`, name, parent, exists, glob, read and write, unlink), through the same
pyarrow filesystem Ray Train opens for the URI: endpoint and credentials come from the environment, as they
do for Ray (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...). A file written to a
RemotePath appears whole (one object upload), so no temp file and rename is needed there.

What must stay on a local disk (the driver's log file, the MLflow outage buffer) lives under `local_root`.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
LOCAL_DIR_ENV = "OODLAB_LOCAL_DIR"  # local files of runs stored under a URI (default ~/.cache/oodlab)
ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", LOCAL_DIR_ENV)  # what Ray's workers need to reach the same storage


class RemotePath:
    """A file or folder under a URI, e.g. `s3://bucket/oodlab/runs`."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"{uri}: unsupported storage scheme '{parts.scheme}'; use a local path or one of "
                             f"{', '.join(f'{s}://' for s in SCHEMES)}")
        if parts.query or not parts.netloc:
            raise ValueError(f"{uri}: expected {parts.scheme}://BUCKET/PATH with no query; give the endpoint and "
                             "credentials in the environment (e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)")
        key = posixpath.normpath(parts.path or "/").strip("/")
        self.scheme, self.bucket, self.key = parts.scheme, parts.netloc, "" if key == "." else key

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: str | Path) -> RemotePath:
        return RemotePath(f"{self}/{part}")

    @property
    def fs_path(self) -> str:
        """The path as pyarrow's filesystem names it: bucket/key."""
        return posixpath.join(self.bucket, self.key).rstrip("/")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{self.bucket}/{posixpath.dirname(self.key)}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def _fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme, self.bucket)

    def _type(self) -> pafs.FileType:
        return self._fs().get_file_info(self.fs_path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """The entries directly in this folder whose name matches `pattern` (one path component)."""
        if "/" in pattern:
            raise ValueError(f"RemotePath.glob takes one path component, not {pattern!r}")
        for info in self._fs().get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True)):
            if fnmatch.fnmatchcase(info.base_name, pattern):
                yield self / info.base_name

    def read_bytes(self) -> bytes:
        with self._fs().open_input_stream(self.fs_path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self._fs().open_output_stream(self.fs_path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self) -> None:
        self._fs().delete_file(self.fs_path)

    def mkdir(self, parents: bool = True) -> None:
        self._fs().create_dir(self.fs_path, recursive=parents)


StoragePath = Path | RemotePath


@functools.cache
def filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One pyarrow filesystem per bucket, resolved as Ray Train resolves its storage_path."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def is_uri(text: str | StoragePath) -> bool:
    return "://" in str(text)


def location(text: str | StoragePath) -> StoragePath:
    """A local path or a URI as the object that reads and writes it."""
    if isinstance(text, (Path, RemotePath)):
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a local path or a URI such as s3://bucket/path, not {type(text).__name__}")
    return RemotePath(text) if is_uri(text) else Path(text)


def move(source: StoragePath, target: StoragePath) -> None:
    """Move a file or folder (a rename on a local disk; copy then delete under a URI)."""
    if isinstance(source, Path):
        shutil.move(source, target)
        return
    fs = source._fs()
    pafs.copy_files(source.fs_path, target.fs_path, source_filesystem=fs, destination_filesystem=target._fs())
    if source.is_dir():
        fs.delete_dir(source.fs_path)
    else:
        fs.delete_file(source.fs_path)


def upload(local: Path, target: RemotePath) -> None:
    """Copy a local file to a path under a URI, streamed (one object, which appears whole)."""
    pafs.copy_files(str(local), target.fs_path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target._fs())


def remove(path: StoragePath) -> None:
    """Delete a folder and everything in it."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path._fs().delete_dir(path.fs_path)


def local_root(storage: StoragePath) -> Path:
    """Where files that must stay local go: the storage folder itself, or for a URI a mirror of its path under
    $OODLAB_LOCAL_DIR (default ~/.cache/oodlab) on each machine."""
    if isinstance(storage, Path):
        return storage
    return Path(os.environ.get(LOCAL_DIR_ENV, "~/.cache/oodlab")).expanduser() / storage.scheme / storage.fs_path


def storage_env() -> dict[str, str]:
    """The storage endpoint and credentials set in this environment, for Ray's workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and v}
