"""Image fetches over http(s): the SSRF guard (every hop's addresses checked, the connection pinned to a
checked address), the redirect cap, the total deadline, the byte cap and retries of transient failures.

Real HTTP servers on 127.0.0.1 stand in for public ones by being listed in the allowed networks with
their port; every other loopback port stays refused. No test may connect anywhere but loopback: the
autouse fixture ``connections`` fails any other connection before it is made.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
from PIL import Image
from pydantic import ValidationError

from producer.errors import ImageError
from workers.fetch import AllowedNetwork, FetchPolicy, fetch_url
from workers.images import load_image
from workers.settings import ImageSettings

BODY = b"image bytes"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        name = url.path.strip("/").split("/")[0]
        self.server.hits[name] += 1
        self.server.hosts.append(self.headers.get("Host", ""))
        getattr(self, f"_{name.replace('-', '_')}", self._img)(url)

    def _img(self, url: Any) -> None:
        self._send(200, self.server.body)

    def _host(self, url: Any) -> None:
        self._send(200, self.headers.get("Host", "").encode())

    def _redirect(self, url: Any) -> None:
        self._send(302, b"", Location=parse_qs(url.query)["to"][0])

    def _chain(self, url: Any) -> None:
        left = int(url.path.split("/")[2])
        if left:
            self._send(302, b"", Location=f"/chain/{left - 1}")
        else:
            self._send(200, BODY)

    def _flaky(self, url: Any) -> None:  # 503 twice, then the image
        if self.server.hits["flaky"] <= 2:
            self._send(503, b"busy")
        else:
            self._send(200, BODY)

    def _busy(self, url: Any) -> None:
        self._send(503, b"busy")

    def _limited(self, url: Any) -> None:  # 429 once, then the image
        if self.server.hits["limited"] == 1:
            self._send(429, b"slow down", **{"Retry-After": "0"})
        else:
            self._send(200, BODY)

    def _missing(self, url: Any) -> None:
        self._send(404, b"no")

    def _trickle(self, url: Any) -> None:  # a byte every 0.1 s: no read waits long, the whole takes 100 s
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client hung up

    def _slow_headers(self, url: Any) -> None:  # a header line every 0.1 s
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        try:
            for _ in range(90):
                self.wfile.write(b"X-Slow: 1\r\n")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def _big(self, url: Any) -> None:
        self._send(200, b"x" * 20_000)

    def _big_unsized(self, url: Any) -> None:  # no Content-Length: the body ends when the connection does
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"x" * 20_000)
        self.close_connection = True

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port: int = self.server_address[1]
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.body = BODY
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (address, port) a socket connects to; a connection off loopback fails before it is made."""
    seen: list[tuple[str, int]] = []
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> None:
        seen.append((address[0], address[1]))
        assert ipaddress.ip_address(address[0]).is_loopback, f"a connection to {address} was attempted"
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    return seen


@pytest.fixture
def public() -> Iterator[_Server]:
    """A server the tests treat as public: its address and port are in the allowed networks."""
    server = _Server()
    yield server
    server.stop()


@pytest.fixture
def private() -> Iterator[_Server]:
    """Another loopback server, on a port nothing allows."""
    server = _Server()
    yield server
    server.stop()


def _policy(*allowed: str, **options: Any) -> FetchPolicy:
    settings = {"max_bytes": 10_000, "timeout_s": 1.0, "total_timeout_s": 5.0, "backoff_s": 0.05, **options}
    return FetchPolicy(allowed_networks=tuple(AllowedNetwork.parse(a) for a in allowed), **settings)


def _refused(url: str, policy: FetchPolicy) -> ImageError:
    with pytest.raises(ImageError) as e:
        fetch_url(url, policy)
    return e.value


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img",
        "http://localhost:{port}/img",
        "http://10.0.0.1/img",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of the metadata address
        "http://[::1]:{port}/img",
        "http://0.0.0.0:{port}/img",
        "http://2130706433:{port}/img",  # 127.0.0.1 as one number
    ],
)
def test_the_default_policy_refuses_non_public_addresses_without_connecting(url, public, connections):
    error = _refused(url.format(port=public.port), _policy())
    assert error.code == "url_not_allowed"
    assert connections == [] and public.hits.total() == 0


def test_an_allowed_address_and_port_is_fetched(public, connections):
    assert fetch_url(f"http://127.0.0.1:{public.port}/img", _policy(f"127.0.0.1:{public.port}")) == BODY
    assert connections == [("127.0.0.1", public.port)]
    assert public.hosts == [f"127.0.0.1:{public.port}"]
    # The same address on another port is not allowed by that entry; a whole network is, on any port.
    assert _refused(f"http://127.0.0.1:{public.port}/img", _policy("127.0.0.1:1")).code == "url_not_allowed"
    assert fetch_url(f"http://127.0.0.1:{public.port}/img", _policy("127.0.0.0/8")) == BODY


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.1.2.3/img",
        "http://127.0.0.1:{private}/img",
        "http://[::1]:{private}/img",
        "http://localhost:{private}/img",
    ],
)
def test_a_redirect_to_a_refused_address_is_not_followed(target, public, private, connections):
    to = target.format(private=private.port)
    error = _refused(f"http://127.0.0.1:{public.port}/redirect?to={to}", _policy(f"127.0.0.1:{public.port}"))
    assert error.code == "url_not_allowed"
    assert connections == [("127.0.0.1", public.port)]
    assert private.hits.total() == 0 and public.hits == {"redirect": 1}


def test_a_redirect_to_an_allowed_address_is_followed_with_its_own_host_header(public, private, connections):
    policy = _policy(f"127.0.0.1:{public.port}", f"127.0.0.1:{private.port}")
    url = f"http://127.0.0.1:{public.port}/redirect?to=http://127.0.0.1:{private.port}/img"
    assert fetch_url(url, policy) == BODY
    assert connections == [("127.0.0.1", public.port), ("127.0.0.1", private.port)]
    assert private.hosts == [f"127.0.0.1:{private.port}"]


def test_a_redirect_to_another_scheme_is_refused(public):
    url = f"http://127.0.0.1:{public.port}/redirect?to=file:///etc/passwd"
    assert _refused(url, _policy(f"127.0.0.1:{public.port}")).code == "url_not_allowed"


def test_redirects_are_capped(public):
    policy = _policy(f"127.0.0.1:{public.port}")
    assert fetch_url(f"http://127.0.0.1:{public.port}/chain/5", policy) == BODY
    public.hits.clear()
    error = _refused(f"http://127.0.0.1:{public.port}/chain/6", policy)
    assert error.code == "image_fetch_failed" and "more than 5 redirects" in error.message
    assert public.hits["chain"] == 6  # the sixth redirect is not followed, nor retried


@pytest.mark.parametrize("path", ["trickle", "slow-headers"])
def test_a_server_that_trickles_is_cut_off_at_the_total_deadline(path, public):
    # Each byte comes well within the per-read timeout; only the total deadline stops the download.
    policy = _policy(f"127.0.0.1:{public.port}", timeout_s=0.5, total_timeout_s=1.0, max_bytes=100_000)
    start = time.monotonic()
    error = _refused(f"http://127.0.0.1:{public.port}/{path}", policy)
    assert error.code == "image_fetch_failed" and "timed out" in error.message
    assert time.monotonic() - start < 2.5  # 1 s and some slack for a busy machine, not 100 s
    assert public.hits[path] == 1


def test_a_stalled_server_times_out_and_retries_stay_within_the_deadline(public):
    # /trickle stalls no read, so use a per-read timeout shorter than its 0.1 s between bytes.
    policy = _policy(f"127.0.0.1:{public.port}", timeout_s=0.05, total_timeout_s=2.0, backoff_s=0.05)
    error = _refused(f"http://127.0.0.1:{public.port}/trickle", policy)
    assert error.code == "image_fetch_failed" and "timed out" in error.message
    assert public.hits["trickle"] == 3  # every attempt timed out


def test_transient_failures_are_retried_with_backoff(public):
    policy = _policy(f"127.0.0.1:{public.port}", backoff_s=0.1)
    start = time.monotonic()
    assert fetch_url(f"http://127.0.0.1:{public.port}/flaky", policy) == BODY
    assert public.hits["flaky"] == 3
    assert time.monotonic() - start >= 0.1 + 0.2  # backoff doubles
    assert fetch_url(f"http://127.0.0.1:{public.port}/limited", policy) == BODY
    assert public.hits["limited"] == 2


def test_persistent_and_client_errors(public):
    policy = _policy(f"127.0.0.1:{public.port}")
    error = _refused(f"http://127.0.0.1:{public.port}/busy", policy)
    assert error.code == "image_fetch_failed" and "HTTP 503" in error.message and "3 tries" in error.message
    assert public.hits["busy"] == 3
    error = _refused(f"http://127.0.0.1:{public.port}/missing", policy)
    assert error.code == "image_fetch_failed" and "HTTP 404" in error.message
    assert public.hits["missing"] == 1  # a 4xx is not retried


def test_backoff_does_not_run_past_the_deadline(public):
    policy = _policy(f"127.0.0.1:{public.port}", total_timeout_s=1.0, backoff_s=0.4, attempts=5)
    start = time.monotonic()
    assert _refused(f"http://127.0.0.1:{public.port}/busy", policy).code == "image_fetch_failed"
    assert time.monotonic() - start < 1.0  # it gives up at once rather than sleep past the deadline
    assert public.hits["busy"] == 2  # tries at 0 and 0.4 s; a third would start at 1.2 s, past 1 s


def test_a_refused_connection_is_a_fetch_failure(public):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    error = _refused(f"http://127.0.0.1:{port}/img", _policy(f"127.0.0.1:{port}"))
    assert error.code == "image_fetch_failed"


@pytest.mark.parametrize("path", ["big", "big-unsized"])
def test_bodies_over_the_byte_cap_are_refused(path, public):
    error = _refused(f"http://127.0.0.1:{public.port}/{path}", _policy(f"127.0.0.1:{public.port}"))
    assert error.code == "image_too_large"


class _FakeDNS:
    """Names with made-up answers: name -> the answers of its successive lookups (the last repeats)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: Counter[str] = Counter()
        self._resolve = socket.getaddrinfo

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in self.answers:
            return self._resolve(host, port, *args, **kwargs)
        self.lookups[host] += 1
        addresses = self.answers[host][min(self.lookups[host], len(self.answers[host])) - 1]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> _FakeDNS:
    fake = _FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def test_a_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(public, dns, connections):
    # The first answer passes the check; a second lookup would get the metadata address (DNS rebinding).
    dns.answers["images.example"] = [["127.0.0.1"], ["169.254.169.254"]]
    url = f"http://images.example:{public.port}/host"
    assert fetch_url(url, _policy(f"127.0.0.1:{public.port}")) == f"images.example:{public.port}".encode()
    assert dns.lookups["images.example"] == 1
    assert connections == [("127.0.0.1", public.port)]


def test_a_name_with_any_non_public_address_is_refused(public, dns, connections):
    dns.answers["mixed.example"] = [["8.8.8.8", "10.0.0.5"]]
    dns.answers["metadata.example"] = [["169.254.169.254"]]
    policy = _policy(f"127.0.0.1:{public.port}")
    for name in ("mixed.example", "metadata.example"):
        error = _refused(f"http://{name}/img", policy)
        assert error.code == "url_not_allowed" and name in error.message
    # A redirect to such a name is refused the same way.
    url = f"http://127.0.0.1:{public.port}/redirect?to=http://metadata.example/latest/"
    assert _refused(url, policy).code == "url_not_allowed"
    assert connections == [("127.0.0.1", public.port)]


@dataclass
class _HTTPS:
    server: _Server
    client_tls: ssl.SSLContext
    names: list[str | None]
    """The server names (SNI) clients asked for."""


@pytest.fixture
def https(dns: _FakeDNS) -> Iterator[_HTTPS]:
    """An https server for ``images.example`` (and, by a fake DNS, ``other.example``) on 127.0.0.1, with a
    certificate from a test CA that ``client_tls`` trusts."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.example").configure_cert(server_tls)
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    dns.answers["images.example"] = [["127.0.0.1"]]
    dns.answers["other.example"] = [["127.0.0.1"]]
    server = _Server(tls=server_tls)
    yield _HTTPS(server, client_tls, names)
    server.stop()


def test_https_pins_the_address_and_checks_the_certificate_for_the_name(https, connections):
    port = https.server.port
    policy = _policy(f"127.0.0.1:{port}", ssl_context=https.client_tls)
    url = f"https://images.example:{port}/host"
    assert fetch_url(url, policy) == f"images.example:{port}".encode()
    assert https.names == ["images.example"]
    # The certificate is checked against the name in the URL, not the address connected to, and a
    # certificate that does not match is not retried.
    error = _refused(f"https://other.example:{port}/host", policy)
    assert error.code == "image_fetch_failed" and "other.example" in error.message
    # Nor is the system's trust fooled by the test CA.
    assert _refused(url, _policy(f"127.0.0.1:{port}")).code == "image_fetch_failed"
    assert connections == [("127.0.0.1", port)] * 3
    assert https.server.hits.total() == 1


@pytest.mark.parametrize("path", ["trickle", "slow-headers"])
def test_an_https_server_that_trickles_is_cut_off_at_the_total_deadline(path, https):
    port = https.server.port
    limits = {"timeout_s": 0.5, "total_timeout_s": 1.0, "max_bytes": 100_000}
    policy = _policy(f"127.0.0.1:{port}", ssl_context=https.client_tls, **limits)
    start = time.monotonic()
    error = _refused(f"https://images.example:{port}/{path}", policy)
    assert error.code == "image_fetch_failed" and "timed out" in error.message
    assert time.monotonic() - start < 2.5  # 1 s and some slack for a busy machine, not 100 s


def test_ipv6_addresses_are_pinned_too(connections):
    try:
        server = _Server("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        url = f"http://[::1]:{server.port}/host"
        assert fetch_url(url, _policy(f"[::1]:{server.port}")) == f"[::1]:{server.port}".encode()
    finally:
        server.stop()
    assert connections == [("::1", server.port)]


def test_allowed_networks_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IMAGEQA_ALLOWED_URL_NETWORKS", "10.0.0.0/8, 192.168.1.5:8080,[fd00::1]:443")
    monkeypatch.setenv("IMAGEQA_URL_TOTAL_TIMEOUT_S", "12")
    policy = ImageSettings().fetch_policy()
    assert policy.total_timeout_s == 12
    assert policy.allowed_networks == (
        AllowedNetwork(ipaddress.ip_network("10.0.0.0/8")),
        AllowedNetwork(ipaddress.ip_network("192.168.1.5/32"), 8080),
        AllowedNetwork(ipaddress.ip_network("fd00::1/128"), 443),
    )
    assert policy.allows(ipaddress.ip_address("10.9.9.9"), 80)
    assert policy.allows(ipaddress.ip_address("192.168.1.5"), 8080)
    assert not policy.allows(ipaddress.ip_address("192.168.1.5"), 8081)
    assert not policy.allows(ipaddress.ip_address("169.254.169.254"), 80)
    assert policy.allows(ipaddress.ip_address("8.8.8.8"), 80)
    bad_entries = ["10.0.0.300", "10.0.0.1:http", "10.0.0.1:0", "10.0.0.1:", "[fd00::1", "fd00::1]:80"]
    for bad in [*bad_entries, "10.0.0.1/8"]:
        with pytest.raises(ValidationError):
            ImageSettings(allowed_url_networks=[bad])


def test_an_image_over_http_through_the_settings(public, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 9), "green").save(buf, "PNG")
    public.body = buf.getvalue()
    url = f"http://127.0.0.1:{public.port}/img"
    settings = ImageSettings(media_roots=[tmp_path], allowed_url_networks=[f"127.0.0.1:{public.port}"])
    assert load_image(url, settings).size == (16, 9)
    with pytest.raises(ImageError) as e:
        load_image(url, ImageSettings(media_roots=[tmp_path]))
    assert e.value.code == "url_not_allowed"
