"""Fetching URLs that clients give (images, webhook receivers) without
letting them reach inside the network: loopback, private, link-local,
carrier-grade NAT, multicast, reserved and cloud-metadata addresses are
refused in every spelling (IPv4-mapped IPv6, decimal, octal, hex), on every
redirect hop, and the connection goes to the very address that was checked,
so a DNS answer that changes between check and connect cannot redirect it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import certifi
import urllib3
import urllib3.connection

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: host, port -> the addresses it resolves to (socket.getaddrinfo's shape, reduced).
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL_LENGTH = 4096
USER_AGENT = "segq-fetcher/1"


class UrlRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


class FetchFailed(RuntimeError):
    """The URL was allowed, but fetching it failed; the message says why."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    #: Per connect and per read; the whole fetch, every hop included, gets
    #: three times this, so a server dripping bytes cannot hold a worker.
    timeout_seconds: float = 10.0
    max_redirects: int = 3
    #: Networks let through although not public: for tests, or a deployment
    #: that means to fetch from an internal image server.
    allowed_networks: tuple[IpNetwork, ...] = field(default_factory=tuple)


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip())


def _embedded_ipv4(address: IpAddress) -> IpAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), if any."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_allowed(address: IpAddress, policy: FetchPolicy) -> bool:
    if any(address in network for network in policy.allowed_networks):
        return True
    inner = _embedded_ipv4(address)
    if inner is not address and any(inner in network for network in policy.allowed_networks):
        return True
    return all(a.is_global and not a.is_multicast for a in (address, inner))


def literal_address(host: str) -> IpAddress | None:
    """The address ``host`` spells, in any form a resolver would accept
    (2130706433, 0177.0.0.1, 0x7f.1, ::ffff:127.0.0.1), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton takes every legacy IPv4 spelling that getaddrinfo does.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_url(url: str, policy: FetchPolicy) -> SplitResult:
    """Refuse what can be refused without DNS: scheme, shape, credentials,
    and addresses written into the URL."""
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRefused("URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("URL must be http or https")
    if not parts.hostname:
        raise UrlRefused("URL has no host")
    try:
        ascii_host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise UrlRefused("URL host is not a valid name (a label is empty or too long)") from None
    if ascii_host != parts.hostname:
        raise UrlRefused("write an international domain name in its ASCII (xn--) form")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("URL may not carry credentials")
    if port == 0:
        raise UrlRefused("URL port must be 1-65535")
    address = literal_address(parts.hostname)
    if address is not None and not address_allowed(address, policy):
        raise UrlRefused("URL points at a private, loopback or reserved address")
    return parts


def system_resolver(host: str, port: int) -> list[str]:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"cannot resolve {host}: {exc.strerror}") from None
    return [str(answer[4][0]) for answer in answers]


def _checked_address(host: str, port: int, policy: FetchPolicy, resolve: Resolver) -> str:
    """One address to connect to, after checking every address the name has:
    a name with any private answer is refused outright."""
    answers = (
        [literal_address(host)]
        if literal_address(host)
        else [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    )
    if not answers:
        raise FetchFailed(f"{host} has no address")
    for address in answers:
        assert address is not None
        if not address_allowed(address, policy):
            raise UrlRefused(f"{host} resolves to a private, loopback or reserved address")
    return str(answers[0])


def fetch(url: str, policy: FetchPolicy, resolve: Resolver = system_resolver) -> bytes:
    """GET ``url`` under ``policy``; at most ``policy.max_bytes`` of body."""
    deadline = time.monotonic() + 3 * policy.timeout_seconds
    for _hop in range(policy.max_redirects + 1):
        parts, address, port = _checked_target(url, policy, resolve)
        pool = _pool(parts, address, port, policy)
        try:
            response = _get(pool, parts)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed(f"{response.status} redirect without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise FetchFailed(f"the server answered {response.status}")
                return _read_bounded(response, policy.max_bytes, deadline)
            finally:
                response.release_conn()
        finally:
            pool.close()
    raise FetchFailed(f"more than {policy.max_redirects} redirects")


def _checked_target(
    url: str, policy: FetchPolicy, resolve: Resolver
) -> tuple[SplitResult, str, int]:
    """Check ``url`` and every address of its host: the URL's parts, the
    address to connect to, and the port."""
    parts = check_url(url, policy)
    host = parts.hostname
    assert host is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts, _checked_address(host, port, policy, resolve), port


def _tls_options(parts: SplitResult) -> dict[str, Any]:
    """Connect to the checked address; verify the certificate for the name."""
    return {
        "server_hostname": parts.hostname,
        "assert_hostname": parts.hostname,
        "cert_reqs": "CERT_REQUIRED",
        "ca_certs": certifi.where(),
    }


def _pool(
    parts: SplitResult, address: str, port: int, policy: FetchPolicy
) -> urllib3.HTTPConnectionPool:
    """A connection pool to the checked ``address``, never to the name."""
    timeout = urllib3.Timeout(connect=policy.timeout_seconds, read=policy.timeout_seconds)
    if parts.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            address, port, timeout=timeout, retries=False, **_tls_options(parts)
        )
    return urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    policy: FetchPolicy,
    resolve: Resolver = system_resolver,
) -> int:
    """POST ``body`` to ``url`` under ``policy``; the status code of the
    answer, whose body is not read. Redirects are never followed: the caller
    decides what a 3xx means. The whole exchange, from connecting to the
    answer's last header, is cut off after twice the timeout, so a receiver
    that drips its answer cannot hold the caller (socket timeouts alone
    restart at every byte)."""
    parts, address, port = _checked_target(url, policy, resolve)
    connection = _connection(parts, address, port, policy)
    limit = 2 * policy.timeout_seconds
    cut_off = threading.Event()

    def cut() -> None:
        cut_off.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(limit, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(
            "POST",
            _target(parts),
            body=body,
            headers={**headers, "Host": _host_header(parts), "User-Agent": USER_AGENT},
            preload_content=False,
        )
        status: int = connection.getresponse().status
        if cut_off.is_set():  # the headers ended because the watchdog hung up
            raise TimeoutError
    except (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
        if cut_off.is_set():
            raise FetchFailed(f"the answer took longer than {limit:g} s") from None
        # Before the timeouts: urllib3 derives a refused connection from its
        # connect timeout, and a receiver that is down is not a slow one.
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            raise FetchFailed(f"could not connect: {exc.__context__ or exc}") from None
        if isinstance(exc, TimeoutError | urllib3.exceptions.TimeoutError):
            raise FetchFailed(f"no answer within {policy.timeout_seconds:g} s") from None
        raise FetchFailed(f"could not reach the URL: {type(exc).__name__}") from None
    finally:
        watchdog.cancel()
        connection.close()
    return status


def _connection(
    parts: SplitResult, address: str, port: int, policy: FetchPolicy
) -> urllib3.connection.HTTPConnection:
    """One connection to the checked ``address``, never to the name."""
    if parts.scheme == "https":
        return urllib3.connection.HTTPSConnection(
            address, port, timeout=policy.timeout_seconds, **_tls_options(parts)
        )
    return urllib3.connection.HTTPConnection(address, port, timeout=policy.timeout_seconds)


def _target(parts: SplitResult) -> str:
    """The request target: path and query."""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _host_header(parts: SplitResult) -> str:
    host = parts.hostname
    assert host is not None
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return host if parts.port is None else f"{host}:{parts.port}"


def _get(pool: urllib3.HTTPConnectionPool, parts: SplitResult) -> Any:
    try:
        return pool.urlopen(
            "GET",
            _target(parts),
            headers={"Host": _host_header(parts), "User-Agent": USER_AGENT},
            redirect=False,
            preload_content=False,
            assert_same_host=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        raise FetchFailed(f"could not fetch the URL: {type(exc).__name__}") from None


def _read_bounded(response: Any, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed(f"the image is larger than {max_bytes} bytes")
    body = bytearray()
    try:
        # Counted after decompression, so a gzip bomb is cut off too.
        while True:
            # read1: what has arrived, not a full buffer, so the deadline is
            # checked while a server drips.
            chunk = response.read1(65536, decode_content=True)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise FetchFailed(f"the image is larger than {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchFailed("the server sent the image too slowly")
    except urllib3.exceptions.HTTPError as exc:
        raise FetchFailed(f"could not read the URL: {type(exc).__name__}") from None
    return bytes(body)
