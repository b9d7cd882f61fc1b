"""Fetching http(s) images without being a way into the worker's network (SSRF).

Each hop's host name is resolved once and every address it resolves to is checked before anything
connects; the connection then goes to a checked address (the Host header, TLS SNI and the certificate
check keep the name), so a name that resolves again to another address gets nowhere. Redirects are
followed here, each hop checked the same way, at most ``max_redirects`` of them. Transient failures
(timeouts, broken connections, HTTP 429 and 5xx) are retried with exponential backoff; everything,
retries included, stays within one total deadline, and the body within a byte cap.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import TypeAlias
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, DecodeError, ProtocolError, ReadTimeoutError
from urllib3.util.ssl_match_hostname import CertificateError

from producer.errors import ErrorCode, ImageError

log = logging.getLogger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
FETCH_ATTEMPTS = 3
"""Tries of one fetch when it fails in a way that may pass (timeout, broken connection, 429, 5xx)."""
BACKOFF_S = 0.5
"""Wait before the second try; doubled before each further one (or the server's Retry-After)."""
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class AllowedNetwork:
    """A non-public network or address that image URLs may point to, on any port or on one."""

    network: IPNetwork
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedNetwork:
        """``10.0.0.0/8``, ``10.1.2.3``, ``10.1.2.3:8080``, ``fd00::/8``, ``[fd00::1]:8080``."""
        text = text.strip()
        host, port_text = text, None
        try:
            if text.startswith("["):
                host, closed, rest = text[1:].partition("]")
                if not closed or (rest and not rest.startswith(":")):
                    raise ValueError("an IPv6 address goes in [ ] before the :port")
                port_text = rest[1:] if rest else None
            elif text.count(":") == 1:
                host, _, port_text = text.partition(":")
            port = None if port_text is None else int(port_text)
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
            return cls(ipaddress.ip_network(host), port)
        except ValueError as e:
            raise ValueError(f"{text!r} is not an address or network with an optional :port ({e})") from e

    def allows(self, address: IPAddress, port: int) -> bool:
        return address in self.network and self.port in (None, port)


@dataclass(frozen=True)
class FetchPolicy:
    """Where an image fetch may connect, for how long and how much it may read."""

    max_bytes: int
    timeout_s: float = 10.0
    """Longest wait for one connect or one read."""
    total_timeout_s: float = 30.0
    """Deadline of the whole fetch: every try, redirect, read and backoff."""
    allow_private: bool = False
    """Any address at all (off: public addresses and ``allowed_networks`` only)."""
    allowed_networks: tuple[AllowedNetwork, ...] = ()
    max_redirects: int = MAX_REDIRECTS
    attempts: int = FETCH_ATTEMPTS
    backoff_s: float = BACKOFF_S
    ssl_context: ssl.SSLContext | None = None
    """Trust for https; None: the system's CAs."""

    def allows(self, address: IPAddress, port: int) -> bool:
        target = _embedded_ipv4(address) or address
        if self.allow_private or target.is_global:
            return True
        return any(n.allows(target, port) for n in self.allowed_networks)


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """The body of the http(s) ``url``, fetched under ``policy``. Raises `ImageError` with code
    ``url_not_allowed`` (a hop on a refused address or scheme), ``image_too_large`` (over ``max_bytes``)
    or ``image_fetch_failed`` (anything else, once transient failures have been retried)."""
    deadline = time.monotonic() + policy.total_timeout_s
    attempt = 1
    while True:
        try:
            return _follow(url, policy, deadline)
        except _Transient as e:
            delay_s = max(policy.backoff_s * 2 ** (attempt - 1), e.retry_after_s)
            if attempt >= policy.attempts or time.monotonic() + delay_s >= deadline:
                tries = f" ({attempt} tries)" if attempt > 1 else ""
                raise ImageError(
                    f"cannot fetch {_short(url)}: {e}{tries}", code=ErrorCode.IMAGE_FETCH_FAILED
                ) from e
            log.info("fetching %s failed (%s); try %d in %.2f s", _short(url), e, attempt + 1, delay_s)
            time.sleep(delay_s)
            attempt += 1


class _Transient(Exception):
    """A failure that may pass: the fetch is tried again after a backoff."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Hop:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> _Hop:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ImageError(
                f"{_short(url)} is not a valid URL: {e}", code=ErrorCode.IMAGE_FETCH_FAILED
            ) from e
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"{_short(url)}: only http(s) URLs with a host", code=ErrorCode.URL_NOT_ALLOWED)
        try:  # an internationalised name in its ASCII form, as DNS, the Host header and TLS want it
            host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode()
        except UnicodeError as e:
            raise ImageError(
                f"{_short(url)} has an invalid host name: {e}", code=ErrorCode.IMAGE_FETCH_FAILED
            ) from e
        default_port = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        host_header = name if port in (None, default_port) else f"{name}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(url, scheme, host, port or default_port, path, host_header)


@dataclass(frozen=True)
class _Answer:
    status: int
    location: str | None = None
    body: bytes = b""
    retry_after_s: float = 0.0


def _follow(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    for _ in range(policy.max_redirects + 1):
        hop = _Hop.parse(url)
        answer = _get(hop, _checked_addresses(hop, policy), policy, deadline)
        if answer.status in REDIRECT_STATUSES and answer.location:
            url = urljoin(url, answer.location)
            continue
        if 200 <= answer.status < 300:
            return answer.body
        if answer.status == 429 or answer.status >= 500:
            raise _Transient(f"HTTP {answer.status}", answer.retry_after_s)
        raise ImageError(
            f"cannot fetch {_short(url)}: HTTP {answer.status}", code=ErrorCode.IMAGE_FETCH_FAILED
        )
    raise ImageError(
        f"cannot fetch {_short(url)}: more than {policy.max_redirects} redirects",
        code=ErrorCode.IMAGE_FETCH_FAILED,
    )


def _checked_addresses(hop: _Hop, policy: FetchPolicy) -> list[IPAddress]:
    """Every address ``hop.host`` resolves to (one lookup), or `ImageError` if any of them is refused."""
    try:
        infos = socket.getaddrinfo(hop.host, hop.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:  # the resolver could not answer now
            raise _Transient(f"cannot resolve {hop.host!r}: {e}") from e
        raise ImageError(f"cannot resolve {hop.host!r}: {e}", code=ErrorCode.IMAGE_FETCH_FAILED) from e
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    for address in addresses:
        if not policy.allows(address, hop.port):
            raise ImageError(
                f"{_short(hop.url)}: {hop.host} resolves to non-public address {address}; allow it with "
                "IMAGEQA_ALLOWED_URL_NETWORKS (or any with IMAGEQA_ALLOW_PRIVATE_URLS=1)",
                code=ErrorCode.URL_NOT_ALLOWED,
            )
    return addresses


def _get(hop: _Hop, addresses: list[IPAddress], policy: FetchPolicy, deadline: float) -> _Answer:
    """One GET of ``hop`` on a connection to the first of ``addresses`` that accepts one."""
    conn = _connect(hop, addresses, policy, deadline)
    with _Watchdog(conn, deadline) as watchdog:
        try:
            headers = {"Host": hop.host_header, "User-Agent": "imageqa"}
            conn.request("GET", hop.path, headers=headers, preload_content=False)
            response = conn.getresponse()
            if 200 <= response.status < 300:
                return _Answer(response.status, body=_read_body(response, hop, policy, watchdog))
            return _Answer(
                response.status,
                location=response.headers.get("Location"),
                retry_after_s=_retry_after_s(response.headers.get("Retry-After")),
            )
        except (OSError, HTTPException, ProtocolError, ReadTimeoutError) as e:
            watchdog.check(policy)
            timed_out = isinstance(e, (TimeoutError, ReadTimeoutError))
            raise _Transient("timed out" if timed_out else str(e)) from e
        except DecodeError as e:
            raise ImageError(f"cannot fetch {_short(hop.url)}: {e}", code=ErrorCode.IMAGE_FETCH_FAILED) from e


def _connect(hop: _Hop, addresses: list[IPAddress], policy: FetchPolicy, deadline: float) -> HTTPConnection:
    failure = "no address"
    for address in addresses:
        conn = _connection(hop, address, policy, _wait_s(policy, deadline))
        try:
            conn.connect()
            return conn
        except (ssl.SSLError, CertificateError) as e:  # a certificate that fails now fails next time too
            conn.close()
            raise ImageError(f"cannot fetch {_short(hop.url)}: {e}", code=ErrorCode.IMAGE_FETCH_FAILED) from e
        except (OSError, ConnectTimeoutError) as e:  # refused, unreachable, timed out: the next address
            conn.close()
            failure = "timed out" if isinstance(e, ConnectTimeoutError) and "timed out" in str(e) else str(e)
    raise _Transient(failure)


def _connection(hop: _Hop, address: IPAddress, policy: FetchPolicy, timeout_s: float) -> HTTPConnection:
    """A connection to ``address`` only; for https, SNI and the certificate check use the URL's name."""
    if hop.scheme == "https":
        return HTTPSConnection(
            str(address),
            hop.port,
            timeout=timeout_s,
            cert_reqs="CERT_REQUIRED",
            server_hostname=hop.host,
            assert_hostname=hop.host,
            ssl_context=policy.ssl_context or _system_trust(),
        )
    return HTTPConnection(str(address), hop.port, timeout=timeout_s)


class _Watchdog:
    """Shuts the connection's socket down when the total deadline passes, so that no read, of the
    headers or the body, however slowly the server trickles them, runs past it."""

    def __init__(self, conn: HTTPConnection, deadline: float) -> None:
        self.conn = conn
        self.expired = threading.Event()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire, (conn.sock,))
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.conn.close()

    def _expire(self, sock: socket.socket | None) -> None:
        self.expired.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would drop the TLS state
                # under the reading thread's feet; this way its read just meets the end of the stream.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def check(self, policy: FetchPolicy) -> None:
        """`ImageError` if the deadline cut the connection (what was read is not the whole body)."""
        if self.expired.is_set():
            raise _deadline_passed(policy)


def _read_body(
    response: urllib3.BaseHTTPResponse, hop: _Hop, policy: FetchPolicy, watchdog: _Watchdog
) -> bytes:
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageError(
            f"{_short(hop.url)} is {length} bytes, over {policy.max_bytes}", code=ErrorCode.IMAGE_TOO_LARGE
        )
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(CHUNK_BYTES):
        size += len(chunk)
        if size > policy.max_bytes:
            raise ImageError(
                f"{_short(hop.url)} is over {policy.max_bytes} bytes", code=ErrorCode.IMAGE_TOO_LARGE
            )
        chunks.append(chunk)
    watchdog.check(policy)  # a body without a length ends where the watchdog cut it
    return b"".join(chunks)


def _wait_s(policy: FetchPolicy, deadline: float) -> float:
    """How long the next connect or read may wait; `ImageError` once the total deadline has passed."""
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise _deadline_passed(policy)
    return min(policy.timeout_s, left_s)


def _deadline_passed(policy: FetchPolicy) -> ImageError:
    return ImageError(
        f"timed out: the fetch took over its total of {policy.total_timeout_s:g} s",
        code=ErrorCode.IMAGE_FETCH_FAILED,
    )


def _retry_after_s(value: str | None) -> float:
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what it reaches."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@functools.cache
def _system_trust() -> ssl.SSLContext:
    """One context with the system's CAs for every fetch (loading them costs milliseconds)."""
    return ssl.create_default_context()


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:60] + "..." + ref[-40:]
