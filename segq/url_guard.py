"""Fetching URLs that clients give (images, webhook receivers) without
letting them reach inside the network. Only globally reachable unicast
addresses are allowed (an allow-list from IANA's registries, in
segq/global_addresses.py), whatever the spelling (decimal, octal, hex,
trailing dot, any IPv6 form that carries an IPv4 address); names of this
machine and malformed hosts are refused before any DNS; every redirect hop
is checked again, and the connection goes to the very address that was
checked, so a DNS answer that changes between check and connect cannot
redirect it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import certifi
import idna
import urllib3
import urllib3.connection

from segq.global_addresses import IpAddress, IpNetwork, is_globally_reachable_unicast

#: host, port -> the addresses it resolves to (socket.getaddrinfo's shape, reduced).
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL_LENGTH = 4096
USER_AGENT = "segq-fetcher/1"


class UrlRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


class FetchFailed(RuntimeError):
    """The URL was allowed, but fetching it failed; the message says why."""


class HostNotFound(FetchFailed):
    """The URL's host name does not exist or has no address: unlike a
    failure to reach a resolver, asking again soon will not change that."""


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


def address_allowed(address: IpAddress, policy: FetchPolicy) -> bool:
    """Whether a connection may go to ``address``: a globally reachable
    unicast address (segq/global_addresses.py), or one in the policy's
    allowed networks, written plainly or IPv4-mapped (the same socket)."""
    same_socket: tuple[IpAddress, ...] = (address,)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        same_socket += (address.ipv4_mapped,)
    if any(a in network for a in same_socket for network in policy.allowed_networks):
        return True
    return is_globally_reachable_unicast(address)


def literal_address(host: str) -> IpAddress | None:
    """The address ``host`` spells, in any form a resolver would accept
    (2130706433, 0177.0.0.1, 0x7f.1, 127.1, ::ffff:127.0.0.1, fe80::1%eth0),
    with or without one trailing dot, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # A resolver that strips the root's dot reads "127.0.0.1." as 127.0.0.1.
    unrooted = host[:-1] if host.endswith(".") else host
    try:
        return ipaddress.ip_address(unrooted)
    except ValueError:
        pass
    try:
        # inet_aton takes every legacy IPv4 spelling that getaddrinfo does.
        return ipaddress.IPv4Address(socket.inet_aton(unrooted))
    except (OSError, ValueError):
        return None


def check_url(url: str, policy: FetchPolicy) -> SplitResult:
    """Refuse what can be refused without DNS: scheme, shape, credentials,
    the host's syntax, names of this machine, and addresses written into
    the URL."""
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
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("URL may not carry credentials")
    if port == 0:
        raise UrlRefused("URL port must be 1-65535")
    address = _checked_host(parts)
    if address is not None and not address_allowed(address, policy):
        raise UrlRefused("URL points at a private, loopback or reserved address")
    return parts


def _checked_host(parts: SplitResult) -> IpAddress | None:
    """The address the URL's host spells, or None for a name that is
    well-formed and not one of this machine's."""
    host = parts.hostname  # lowercased by urlsplit
    if not host:
        raise UrlRefused("URL has no host")
    if "%" in host:
        raise UrlRefused("URL host may not be percent-encoded or carry an IPv6 zone")
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused("URL host in brackets must be an IPv6 address") from None
    address = literal_address(host)
    if address is not None:
        return address
    if not host.isascii():
        raise UrlRefused("write an international domain name in its ASCII (xn--) form")
    try:
        # Checks labels, hyphens and length, and decodes each A-label to see
        # that it is valid; an A-label never decodes to ASCII, so the ASCII
        # form is the one to compare with "localhost".
        name = idna.encode(host).decode("ascii").rstrip(".")
    except idna.IDNAError as exc:
        raise UrlRefused(f"URL host is not a valid name: {exc}") from None
    last_label = name.rpartition(".")[2]
    if last_label.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last_label):
        # No top-level domain is a number: a resolver or browser would read
        # the host as an address, and it is not a valid one.
        raise UrlRefused("URL host is neither a valid IP address nor a name")
    if name == "localhost" or name.endswith(".localhost"):
        # RFC 6761: these names always mean this machine.
        raise UrlRefused("URL host names this machine (localhost)")
    return None


#: getaddrinfo's answers that the name has no address: NXDOMAIN, or a name
#: with no A/AAAA records. EAI_AGAIN (no answer from a resolver in time) and
#: EAI_FAIL (SERVFAIL) are passing troubles of the resolver, not the name's.
_NO_ADDRESS = frozenset({socket.EAI_NONAME, socket.EAI_NODATA, socket.EAI_ADDRFAMILY})


def system_resolver(host: str, port: int) -> list[str]:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            raise HostNotFound(f"{host} does not resolve: {exc.strerror}") from None
        raise FetchFailed(f"cannot resolve {host}: {exc.strerror}") from None
    return [str(answer[4][0]) for answer in answers]


def _checked_address(host: str, port: int, policy: FetchPolicy, resolve: Resolver) -> str:
    """One address to connect to, after checking every address the name has:
    a name with any answer that is not allowed is refused outright."""
    literal = literal_address(host)
    answers = (
        [literal]
        if literal is not None
        else [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    )
    if not answers:
        raise HostNotFound(f"{host} has no address")
    for address in answers:
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
