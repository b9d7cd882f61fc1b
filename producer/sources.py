"""Where inputs and images live: a local path or an fsspec URL (``s3://``, ``gs://``, ``az://``,
``hf://``, ``https://``), and the reference to an image stored inside a file.

The producer reads rows and the workers read image bytes through the same fsspec URLs, each with the
store's own credentials from its standard environment (``AWS_*`` with ``AWS_ENDPOINT_URL`` for an
S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``, ``HF_TOKEN``): nothing
secret is in a reference. An image inside a Parquet or Arrow file or a tar shard travels as an
`EmbeddedRef`, a URL-like string that names the file and the cell or member, never as bytes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from producer.errors import ErrorCode, InputError

STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf"})
"""Object stores read through fsspec (s3fs, gcsfs, adlfs, huggingface_hub)."""
WEB_SCHEMES = frozenset({"http", "https"})
EMBEDDED_KINDS = ("parquet", "arrow", "tar")

Location = str | Path
"""A local path (`Path`) or a URL (`str`)."""


def is_url(text: str) -> bool:
    """A URL with a scheme of more than one letter (``C:\\`` is a drive, not a scheme)."""
    return "://" in text and len(urlsplit(text).scheme) > 1


def location(text: str | Path) -> Location:
    """A URL stays a string (``file://`` becomes its path); anything else is a `Path`."""
    if isinstance(text, Path):
        return text
    if is_url(text):
        parts = urlsplit(text)
        return Path(parts.path) if parts.scheme.lower() == "file" else text
    return Path(text)


def absolute(loc: Location) -> Location:
    return loc if isinstance(loc, str) else loc.resolve()


def parent(loc: Location) -> Location:
    """The folder that holds ``loc``."""
    if isinstance(loc, Path):
        return loc.parent
    return loc.rstrip("/").rsplit("/", 1)[0]


def join(base: Location, relative: str) -> Location:
    if isinstance(base, Path):
        return base / relative
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"


def suffix(loc: Location) -> str:
    name = loc.name if isinstance(loc, Path) else urlsplit(loc).path.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it (instances are cached by fsspec)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {url}: {e}", code=ErrorCode.INPUT_UNREADABLE) from e


def store_url(fs: Any, path: str) -> str:
    """The URL of ``path`` on ``fs`` (what `filesystem` split)."""
    return str(fs.unstrip_protocol(path))


@contextmanager
def open_input(loc: Location, mode: str = "rb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a local file or a URL for reading; a store's errors become an `InputError`."""
    if isinstance(loc, Path):
        with loc.open(mode, **kwargs) as f:
            yield f
        return
    fs, path = filesystem(loc)
    try:
        f = fs.open(path, mode, **kwargs)
    except Exception as e:  # each store raises its own kinds; all become one clear line
        raise input_error(e, loc) from e
    with f:
        yield f


def is_dir(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_dir()
    fs, path = filesystem(loc)
    try:
        return bool(fs.isdir(path))
    except Exception as e:
        raise input_error(e, loc) from e


def exists(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.exists()
    fs, path = filesystem(loc)
    try:
        return bool(fs.exists(path))
    except Exception as e:
        raise input_error(e, loc) from e


def expand(loc: Location) -> list[Location]:
    """The files a glob (``s3://bucket/train-*.parquet``, ``data/*.tar``) names, sorted; a location
    without ``*``, ``?`` or ``[`` is itself."""
    text = str(loc)
    if not any(c in text for c in "*?["):
        return [loc]
    if isinstance(loc, Path):
        anchor = Path(loc.anchor or ".")
        return sorted(anchor.glob(str(loc.relative_to(anchor)) if loc.is_absolute() else str(loc)))
    fs, path = filesystem(loc)
    try:
        return [store_url(fs, p) for p in sorted(fs.glob(path))]
    except Exception as e:
        raise input_error(e, loc) from e


def input_error(e: BaseException, loc: Location) -> InputError:
    """One clear line for a store's failure to open or list an input."""
    if isinstance(e, InputError):
        return e
    if isinstance(e, FileNotFoundError):
        return InputError(f"input not found: {loc}", code=ErrorCode.INPUT_NOT_FOUND)
    return InputError(f"cannot read {loc}: {store_failure(e)}", code=ErrorCode.INPUT_UNREADABLE)


def store_failure(e: BaseException) -> str:
    """A short description of a store error, without its traceback (and so without any header)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass(frozen=True)
class EmbeddedRef:
    """An image stored inside a file: a Parquet cell (``row_group``, ``row`` within it, ``column``,
    ``item`` of a list cell), an Arrow file's cell (``row`` of the file, ``column``, ``item``) or a tar
    member (data ``offset`` and ``size``, ``name`` for people). Written as the file's location, ``#``,
    the kind, ``:`` and URL-encoded fields: ``s3://b/train.parquet#parquet:rg=0&row=7&col=image``,
    ``/data/shard-0.tar#tar:offset=1536&size=5120&name=000007.jpg``."""

    container: str
    kind: Literal["parquet", "arrow", "tar"]
    column: str | None = None
    row_group: int | None = None
    row: int | None = None
    item: int | None = None
    offset: int | None = None
    size: int | None = None
    name: str | None = None

    _FIELDS = (("col", "column"), ("rg", "row_group"), ("row", "row"), ("item", "item"))
    _TAR_FIELDS = (("offset", "offset"), ("size", "size"), ("name", "name"))

    def __str__(self) -> str:
        fields = self._TAR_FIELDS if self.kind == "tar" else self._FIELDS
        query = urlencode(
            [(key, getattr(self, attr)) for key, attr in fields if getattr(self, attr) is not None]
        )
        return f"{self.container}#{self.kind}:{query}"

    @classmethod
    def parse(cls, ref: str) -> EmbeddedRef | None:
        """The reference ``ref`` stands for, or None when it is not one (or is malformed)."""
        container, sep, fragment = ref.rpartition("#")
        kind, colon, query = fragment.partition(":")
        if not sep or not colon or kind not in EMBEDDED_KINDS or not container:
            return None
        try:
            pairs = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            return None
        fields = cls._TAR_FIELDS if kind == "tar" else cls._FIELDS
        values: dict[str, Any] = {}
        for key, attr in fields:
            if key in pairs:
                text = pairs.pop(key)
                if attr in ("column", "name"):
                    values[attr] = text
                elif text.isdigit():
                    values[attr] = int(text)
                else:
                    return None
        if pairs:
            return None
        needed = ("offset", "size") if kind == "tar" else ("column", "row")
        if any(attr not in values for attr in needed) or (kind == "parquet" and "row_group" not in values):
            return None
        return cls(container=container, kind=kind, **values)  # type: ignore[arg-type]
