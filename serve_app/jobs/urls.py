"""Fetching what a user names by URL (a job's image, its webhook), treating the URL as hostile.

- http and https only, with a host;
- the name is resolved once and every address it gives must be public: loopback, private,
  link-local (the cloud metadata address 169.254.169.254 among them), shared (100.64/10),
  multicast, reserved and unspecified addresses are refused, in IPv4 and IPv6, and so are
  IPv6 addresses that embed a refused IPv4 one, unless ``UrlConfig.allow`` admits them;
- the connection goes to the address that was checked, never to a second lookup (no DNS
  rebinding): the request is sent to the IP, with the name in the Host header and, for https,
  as the TLS server name, so the certificate is still checked against the name;
- every redirect is checked the same way, at most ``max_redirects`` of them;
- connect and read timeouts, and the byte limit enforced while the body streams (and from
  Content-Length before it does).
httpx does the HTTP; this module only decides where it may go.
"""
from __future__ import annotations

import io
import ipaddress
import socket
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from serve_app.config import UrlConfig
from serve_app.errors import UrlRefused, UrlTooLarge, UrlUnreachable

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)


def _embedded_ipv4(ip: IP) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def is_public(ip: IP) -> bool:
    """Whether ``ip`` is a public unicast address (``is_global`` alone admits multicast)."""
    inner = _embedded_ipv4(ip)
    if inner is not None and not is_public(inner):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect and what to tell the server."""

    url: str  # the URL as given (redirects resolved)
    host: str
    address: str  # the checked IP the connection goes to
    port: int
    pinned: str  # the URL with the address in place of the name


Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


class UrlPolicy:
    """Where URLs may lead, from ``UrlConfig``; ``resolver`` is the name lookup (the system's)."""

    def __init__(self, config: UrlConfig, resolver: Resolver = _resolve):
        self.config, self.resolver = config, resolver
        self.allowed = [ipaddress.ip_network(net) for net in config.allow]

    def admits(self, ip: IP) -> bool:
        return is_public(ip) or any(ip in net for net in self.allowed if net.version == ip.version)

    def check(self, url: str) -> Target:
        """The URL's target, once its scheme, host and every address it resolves to pass; else
        UrlRefused (or UrlUnreachable when the name does not resolve)."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise UrlRefused(f"the URL cannot be parsed: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise UrlRefused(f"only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}")
        host = parts.hostname
        if not host:
            raise UrlRefused("the URL names no host")
        if parts.username or parts.password:
            raise UrlRefused("URLs with credentials in them are not fetched")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(host, port)]
            except (OSError, UnicodeError) as exc:
                raise UrlUnreachable(f"{host} does not resolve: {exc}") from None
        if not addresses:
            raise UrlUnreachable(f"{host} resolves to no address")
        refused = [str(ip) for ip in addresses if not self.admits(ip)]
        if refused:  # all or nothing: a name must not mix public and internal addresses
            raise UrlRefused(f"{host} resolves to {', '.join(refused)}, which is not a public address")
        address = str(addresses[0])
        netloc = f"[{address}]:{port}" if addresses[0].version == 6 else f"{address}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        return Target(url, host, address, port, pinned)

    # ------------------------------------------------------------------ requests
    def _client(self) -> httpx.Client:
        c = self.config
        return httpx.Client(timeout=httpx.Timeout(c.read_timeout_s, connect=c.connect_timeout_s),
                            follow_redirects=False, trust_env=False)

    def _send(self, client: httpx.Client, method: str, target: Target, **kwargs) -> httpx.Response:
        headers = {"host": target.host if target.port in (80, 443) else f"{target.host}:{target.port}",
                   "user-agent": "restore-serve", **kwargs.pop("headers", {})}
        request = client.build_request(method, target.pinned, headers=headers,
                                       extensions={"sni_hostname": target.host}, **kwargs)
        try:
            return client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UrlUnreachable(f"{target.host} did not answer in time ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise UrlUnreachable(f"{target.host} could not be reached: {exc}") from None

    def _follow(self, client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
        target = self.check(url)
        for _ in range(self.config.max_redirects + 1):
            response = self._send(client, method, target, **kwargs)
            if response.status_code not in _REDIRECTS or "location" not in response.headers:
                return response
            response.close()
            target = self.check(urljoin(target.url, response.headers["location"]))
            if response.status_code in (301, 302, 303) and method != "GET":  # as browsers do
                method, kwargs = "GET", {}
        raise UrlRefused(f"more than {self.config.max_redirects} redirects")

    def fetch(self, url: str, *, max_bytes: int, check_head: Callable[[bytes], int | None] | None = None) -> bytes:
        """The body at ``url``: UrlTooLarge past ``max_bytes`` (read no further), UrlUnreachable
        on any failure to get a 2xx answer. ``check_head`` sees the first 64 KiB (or the whole
        body when shorter) and may refuse it, ending the download there (an image header's
        pixel count, say), or return a lower byte limit for the rest."""
        body = io.BytesIO()
        self.fetch_to(url, body, max_bytes=max_bytes, check_head=check_head)
        return body.getvalue()

    def fetch_to(self, url: str, target: BinaryIO, *, max_bytes: int,
                 check_head: Callable[[bytes], int | None] | None = None) -> int:
        """``fetch`` into a file, for bodies too large to hold (videos); the bytes written."""
        with self._client() as client:
            response = self._follow(client, "GET", url)
            try:
                if not 200 <= response.status_code < 300:
                    raise UrlUnreachable(f"{url} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise UrlTooLarge(f"{url} holds {declared} bytes; the limit is {max_bytes}")
                return sum(target.write(chunk) for chunk in self._limited(response, url, max_bytes, check_head))
            finally:
                response.close()

    def _limited(self, response: httpx.Response, url: str, max_bytes: int,
                 check_head: Callable[[bytes], int | None] | None) -> Iterator[bytes]:
        total, head = 0, b""
        try:
            for chunk in response.iter_bytes():
                total += len(chunk)
                if check_head is not None and len(head) < 65536:
                    head += chunk
                    if len(head) >= 65536:  # what the head shows may lower the limit (a picture's)
                        max_bytes = min(max_bytes, check_head(head) or max_bytes)
                if total > max_bytes:
                    raise UrlTooLarge(f"{url} sent more than {max_bytes} bytes, the limit")
                yield chunk
        except httpx.TimeoutException:
            raise UrlUnreachable(f"{url} stopped sending (read timeout)") from None
        except httpx.HTTPError as exc:
            raise UrlUnreachable(f"{url} broke off: {exc}") from None
        if check_head is not None and len(head) < 65536:  # a short body: its head is all of it
            limit = min(max_bytes, check_head(head) or max_bytes)
            if total > limit:
                raise UrlTooLarge(f"{url} sent more than {limit} bytes, the limit")

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST ``body`` (a webhook), redirects followed as checked; the answer, read."""
        with self._client() as client:
            response = self._follow(client, "POST", url, content=body, headers=headers)
            try:
                response.read()
            except httpx.HTTPError as exc:
                raise UrlUnreachable(f"{url} broke off: {exc}") from None
            finally:
                response.close()
            return response
