"""Getting image bytes from object stores and from inside dataset files, for `workers.images`.

An object-store URL (``s3://``, ``gs://``, ``az://``, ``hf://``) is read through fsspec with the
store's credentials from the worker's environment, if ``allowed_stores`` lists its scheme (or bucket).
An `EmbeddedRef` reads one image from a file, local (under the media roots) or in a store: a Parquet
cell reads its row group's column (the footer and the column are cached per worker, so the images of
one row group cost one read), an Arrow cell its file (memory-mapped when local), a tar member one
ranged read. Errors become `ImageError`s: ``image_not_found``, ``storage_denied`` (credentials,
permissions, a store not allowed; permanent) or ``storage_unreachable`` (network, throttling, server
errors; a retry may pass).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from producer.errors import ErrorCode, ImageError
from producer.sources import EmbeddedRef, filesystem, is_url, store_failure
from workers.settings import ImageSettings

log = logging.getLogger(__name__)

SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
DENIED_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "GatedRepoError", "CredentialRetrievalError"}
)
"""Exception class names (botocore, huggingface_hub) that mean: credentials missing or refused."""


def local_path(path: Path, settings: ImageSettings) -> Path:
    """``path`` resolved, if it lies under the media roots; else `ImageError` (``path_not_allowed``)."""
    if not path.is_absolute():
        raise ImageError(f"image path {str(path)!r} is not absolute", code=ErrorCode.PATH_NOT_ALLOWED)
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in settings.roots()):
        raise ImageError(f"{path} is outside the allowed media roots", code=ErrorCode.PATH_NOT_ALLOWED)
    return real


def check_store(url: str, settings: ImageSettings) -> None:
    """`ImageError` (``storage_denied``) unless ``allowed_stores`` lists the URL's scheme or a prefix."""
    if not any(_within(url, entry) for entry in settings.allowed_stores):
        raise ImageError(
            f"{_short(url)}: this store is not allowed; list it in IMAGEQA_ALLOWED_STORES",
            code=ErrorCode.STORAGE_DENIED,
        )


def _within(url: str, entry: str) -> bool:
    scheme, _, rest = _normal(url).partition("://")
    allowed_scheme, sep, prefix = _normal(entry).partition("://")
    if scheme != allowed_scheme:
        return False
    if not sep or not prefix.strip("/"):
        return True
    prefix = prefix.rstrip("/")
    return rest == prefix or rest.startswith(prefix + "/")


def _normal(text: str) -> str:
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower()
    return f"{SCHEME_ALIASES.get(scheme, scheme)}{sep}{rest}"


def read_object(url: str, settings: ImageSettings) -> bytes:
    """The bytes of the object at ``url`` (a whole image file in a store)."""
    check_store(url, settings)
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb", cache_type="none") as f:
            size = getattr(f, "size", None)
            if size is not None and size > settings.max_image_bytes:
                raise ImageError(
                    f"{_short(url)} is {size} bytes, over {settings.max_image_bytes}",
                    code=ErrorCode.IMAGE_TOO_LARGE,
                )
            data: bytes = f.read(settings.max_image_bytes + 1)
    except ImageError:
        raise
    except Exception as e:  # every store raises its own kinds; `store_error` sorts them
        raise store_error(e, url) from e
    if len(data) > settings.max_image_bytes:
        raise ImageError(
            f"{_short(url)} is over {settings.max_image_bytes} bytes", code=ErrorCode.IMAGE_TOO_LARGE
        )
    return data


def read_embedded(ref: EmbeddedRef, settings: ImageSettings) -> bytes:
    """The bytes of one image stored inside a Parquet or Arrow file or a tar shard."""
    container = ref.container
    if is_url(container):
        if urlsplit(container).scheme.lower() in ("http", "https"):
            raise ImageError(
                f"{_short(str(ref))}: images inside a file are read from local files or object stores, "
                "not over http(s)",
                code=ErrorCode.URL_NOT_ALLOWED,
            )
        check_store(container, settings)
    else:
        container = str(local_path(Path(container), settings))
    try:
        if ref.kind == "tar":
            data = _tar_member(container, ref, settings)
        else:
            data = _cell_bytes(_cell(container, ref, settings), ref)
    except ImageError:
        raise
    except Exception as e:
        raise store_error(e, str(ref)) from e
    if len(data) > settings.max_image_bytes:
        raise ImageError(
            f"{_short(str(ref))} is {len(data)} bytes, over {settings.max_image_bytes}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    return data


def _tar_member(container: str, ref: EmbeddedRef, settings: ImageSettings) -> bytes:
    assert ref.offset is not None and ref.size is not None
    if ref.size > settings.max_image_bytes:
        raise ImageError(
            f"{_short(str(ref))} is {ref.size} bytes, over {settings.max_image_bytes}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    fs, path = filesystem(container)
    data: bytes = fs.cat_file(path, start=ref.offset, end=ref.offset + ref.size)
    if len(data) != ref.size:
        raise ImageError(
            f"{_short(str(ref))}: the shard is shorter than the member (changed since it was read?)",
            code=ErrorCode.IMAGE_NOT_FOUND,
        )
    return data


def _cell(container: str, ref: EmbeddedRef, settings: ImageSettings) -> Any:
    assert ref.column is not None and ref.row is not None
    if ref.kind == "parquet":
        column = _cache(settings).get(
            (container, ref.row_group, ref.column), lambda: _parquet_column(container, ref)
        )
    else:
        table = _cache(settings).get((container, None, None), lambda: _arrow_table(container))
        if ref.column not in table.column_names:
            raise ImageError(f"{_short(str(ref))}: no column {ref.column!r}", code=ErrorCode.IMAGE_NOT_FOUND)
        column = table.column(ref.column)
    if ref.row >= len(column):
        raise ImageError(f"{_short(str(ref))}: no row {ref.row}", code=ErrorCode.IMAGE_NOT_FOUND)
    value = column[ref.row].as_py()
    if ref.item is not None:
        if not isinstance(value, list) or ref.item >= len(value):
            raise ImageError(f"{_short(str(ref))}: no item {ref.item}", code=ErrorCode.IMAGE_NOT_FOUND)
        value = value[ref.item]
    return value


def _cell_bytes(value: Any, ref: EmbeddedRef) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes):
        raise ImageError(f"{_short(str(ref))} holds no image bytes", code=ErrorCode.IMAGE_NOT_FOUND)
    return data


def _parquet_column(container: str, ref: EmbeddedRef) -> tuple[Any, int]:
    import pyarrow.parquet as pq

    metadata = _footers.get(container)
    fs, path = filesystem(container)
    with fs.open(path, "rb", cache_type="none") as f:
        pf = pq.ParquetFile(f, metadata=metadata, pre_buffer=True)
        if metadata is None:
            _footers.put(container, pf.metadata)
        if ref.row_group is None or ref.row_group >= pf.metadata.num_row_groups:
            raise ImageError(
                f"{_short(str(ref))}: no row group {ref.row_group}", code=ErrorCode.IMAGE_NOT_FOUND
            )
        if ref.column not in pf.schema_arrow.names:
            raise ImageError(f"{_short(str(ref))}: no column {ref.column!r}", code=ErrorCode.IMAGE_NOT_FOUND)
        column = pf.read_row_group(ref.row_group, columns=[ref.column]).column(0)
    return column, column.nbytes


def _arrow_table(container: str) -> tuple[Any, int]:
    import pyarrow as pa

    if not is_url(container):  # memory-mapped: the pages are the OS's cache, not the worker's memory
        source: Any = pa.memory_map(container)
        table = _read_ipc(pa, source)
        return table, 0
    fs, path = filesystem(container)
    with fs.open(path, "rb") as f:
        table = _read_ipc(pa, pa.py_buffer(f.read()))
    return table, table.nbytes


def _read_ipc(pa: Any, source: Any) -> Any:
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:  # not the file format: the stream format save_to_disk writes
        return pa.ipc.open_stream(source).read_all()


def store_error(e: BaseException, ref: str) -> ImageError:
    """The `ImageError` for a store's (or a dataset file's) failure to give an image."""
    what = f"{_short(ref)}: {store_failure(e)}"
    if isinstance(e, FileNotFoundError):
        return ImageError(f"not found: {what}", code=ErrorCode.IMAGE_NOT_FOUND)
    if isinstance(e, PermissionError) or type(e).__name__ in DENIED_ERRORS:
        return ImageError(f"access denied: {what}", code=ErrorCode.STORAGE_DENIED)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return ImageError(f"access denied: {what}", code=ErrorCode.STORAGE_DENIED)
    if status == 404:
        return ImageError(f"not found: {what}", code=ErrorCode.IMAGE_NOT_FOUND)
    if _is_arrow_error(e):
        return ImageError(f"unreadable dataset file: {what}", code=ErrorCode.IMAGE_UNREADABLE)
    return ImageError(f"cannot read: {what}", code=ErrorCode.STORAGE_UNREACHABLE)


def _is_arrow_error(e: BaseException) -> bool:
    import pyarrow as pa

    return isinstance(e, pa.ArrowException) and not isinstance(e, OSError)


class _Footers:
    """Parquet footers by file (a small LRU): a worker reads each file's metadata once."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class ColumnCache:
    """Recently read Parquet columns and Arrow tables, up to ``max_bytes``. One thread reads a missing
    entry while the others that need it wait for it (a row group's images arrive together, since tasks
    are sent in row order), so a row group is read once, not once per image."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._loading: dict[Any, threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], tuple[Any, int]]) -> Any:
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]
                event = self._loading.get(key)
                if event is None:
                    event = self._loading[key] = threading.Event()
                    break
            event.wait()  # another thread is reading it; then look again (it may have failed)
        try:
            value, size = load()
            with self._lock:
                if size <= self.max_bytes:
                    self._items[key] = (value, size)
                    self._bytes += size
                    while self._bytes > self.max_bytes:
                        _, (_, dropped) = self._items.popitem(last=False)
                        self._bytes -= dropped
            return value
        finally:
            with self._lock:
                del self._loading[key]
            event.set()


_footers = _Footers()
_caches: dict[int, ColumnCache] = {}
_caches_lock = threading.Lock()


def _cache(settings: ImageSettings) -> ColumnCache:
    with _caches_lock:
        cache = _caches.get(settings.dataset_cache_bytes)
        if cache is None:
            cache = _caches[settings.dataset_cache_bytes] = ColumnCache(settings.dataset_cache_bytes)
        return cache


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:60] + "..." + ref[-40:]
