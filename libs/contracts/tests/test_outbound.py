"""The outbound SSRF guard: what `outbound_client` and `check_url` refuse, and what they reach.

The loopback test server is real. Where a test needs a reachable "public" host, it uses a
Guard whose policy treats exactly 127.0.0.1 as public and keeps every other rule, and
names resolve through a scripted resolver; production code uses neither seam.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import httpx
import pytest
import trustme

from imgpipe.contracts.netguard import (
    Guard,
    GuardedResolver,
    IPAddress,
    address_refusal,
    checked_socket,
)
from imgpipe.contracts.outbound import URLRefused, check_url, outbound_client
from imgpipe.contracts.settings import Settings
from tests.support.http_server import LoopbackServer, Response, loopback_server

TEST_SERVER = ip_address("127.0.0.1")


def server_is_public(address: IPAddress) -> str | None:
    """The default policy, except that the loopback test server plays a public host."""
    return None if address == TEST_SERVER else address_refusal(address)


class ScriptedResolver:
    """Answers each name from a script, one answer per call, and records every call."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        return [ip_address(a) for a in self.script[host].pop(0)]


def make_settings(*, allow_private: bool) -> Settings:
    return Settings(allow_private_urls=allow_private, max_redirects=5)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LoopbackServer]:
    with loopback_server() as server:  # one per module: stopping one takes half a second
        yield server


@pytest.fixture
def server(shared_server: LoopbackServer) -> LoopbackServer:
    """The loopback server, with only /img served and nothing recorded yet."""
    shared_server.routes.clear()
    shared_server.requests.clear()
    shared_server.add("/img", Response(b"image bytes", content_type="image/jpeg"))
    return shared_server


REFUSED = [
    # IPv4, plain and odd spellings of loopback
    ("http://127.0.0.1/a.jpg", "loopback"),
    ("http://localhost/a.jpg", "loopback"),
    ("http://LocalHost./a.jpg", "loopback"),
    ("http://cdn.localhost/a.jpg", "loopback"),
    ("http://2130706433/a.jpg", "address 127.0.0.1 (written 2130706433) is loopback"),
    ("http://0177.0.0.1/a.jpg", "address 127.0.0.1 (written 0177.0.0.1) is loopback"),
    ("http://0x7f000001/a.jpg", "address 127.0.0.1 (written 0x7f000001) is loopback"),
    ("http://0x7f.1/a.jpg", "address 127.0.0.1 (written 0x7f.1) is loopback"),
    ("http://127.1/a.jpg", "loopback"),
    ("http://127.0.0.1./a.jpg", "loopback"),
    # IPv4 private, shared, link-local, special
    ("http://10.0.0.1/a.jpg", "address 10.0.0.1 is private"),
    ("http://172.16.5.4/a.jpg", "private"),
    ("http://192.168.1.1/a.jpg", "private"),
    ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is link-local"),
    ("http://0xa9fea9fe/latest/meta-data/", "link-local"),
    ("http://100.64.0.1/a.jpg", "carrier-grade NAT"),
    ("http://0.0.0.0/a.jpg", "unspecified"),
    ("http://0/a.jpg", "unspecified"),
    ("http://224.0.0.1/a.jpg", "multicast"),
    ("http://255.255.255.255/a.jpg", "broadcast"),
    ("http://240.0.0.1/a.jpg", "reserved"),
    ("http://192.0.0.9/a.jpg", "reserved"),
    ("http://198.18.0.1/a.jpg", "benchmarking"),
    ("http://192.0.2.10/a.jpg", "documentation"),
    # IPv6 and IPv4 embedded in IPv6
    ("http://[::1]/a.jpg", "address ::1 is loopback"),
    ("http://[::]/a.jpg", "unspecified"),
    ("http://[fe80::1]/a.jpg", "link-local"),
    ("http://[fe80::1%25eth0]/a.jpg", "link-local"),
    ("http://[fc00::1]/a.jpg", "private"),
    ("http://[fd12:3456::1]/a.jpg", "private"),
    ("http://[fec0::1]/a.jpg", "private"),
    ("http://[ff02::1]/a.jpg", "multicast"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "loopback (embeds IPv4 127.0.0.1)"),
    ("http://[::ffff:7f00:1]/a.jpg", "loopback (embeds IPv4 127.0.0.1)"),
    ("http://[::ffff:169.254.169.254]/a.jpg", "link-local"),
    ("http://[64:ff9b::7f00:1]/a.jpg", "loopback (embeds IPv4 127.0.0.1)"),
    ("http://[64:ff9b::a00:1]/a.jpg", "private (embeds IPv4 10.0.0.1)"),
    ("http://[64:ff9b:1::a00:1]/a.jpg", "NAT64"),
    ("http://[2002:7f00:1::]/a.jpg", "loopback (embeds IPv4 127.0.0.1)"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.jpg", "Teredo"),
    ("http://[::7f00:1]/a.jpg", "reserved"),
    ("http://[2001:db8::1]/a.jpg", "documentation"),
    # schemes, credentials, malformed hosts
    ("file:///etc/passwd", "is not allowed: only http, https"),
    ("ftp://example.com/a.jpg", "scheme 'ftp' is not allowed"),
    ("gopher://example.com:70/_x", "scheme 'gopher' is not allowed"),
    ("http://user:pass@example.com/a.jpg", "credentials"),
    ("https://token@example.com/a.jpg", "credentials"),
    ("http://1.2.3.4.5/a.jpg", "not a valid IPv4 address"),
    ("http://%31%32%37.0.0.1/a.jpg", "not a valid"),
]

ALLOWED = [
    "https://example.com/a.jpg",
    "http://images.example.com:8080/a.jpg?size=large",
    "http://8.8.8.8/a.jpg",
    "http://134744072/a.jpg",  # 8.8.8.8 spelled as one number: the address decides
    "http://[2606:4700:4700::1111]/a.jpg",
    "http://[::ffff:8.8.8.8]/a.jpg",
    "http://[64:ff9b::808:808]/a.jpg",  # NAT64 of 8.8.8.8
    "http://[2002:808:808::1]/a.jpg",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_check_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(URLRefused) as refused:
        check_url(url, allow_private=False)
    assert reason in str(refused.value)
    assert refused.value.code == "url_refused"


@pytest.mark.parametrize("url", ALLOWED)
def test_check_url_allows_public_addresses_and_names(url: str) -> None:
    check_url(url, allow_private=False)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/a", "http://localhost/a", "http://2130706433/a", "http://[::1]/a"]
)
def test_allow_private_lifts_the_address_rule(url: str) -> None:
    check_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme"),
        ("ftp://127.0.0.1/a", "scheme"),
        ("http://user:pass@127.0.0.1/a", "credentials"),
    ],
)
def test_allow_private_keeps_scheme_and_credentials_rules(url: str, reason: str) -> None:
    with pytest.raises(URLRefused, match=reason):
        check_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("url", "reason"),
    [(url, reason) for url, reason in REFUSED if "0177" not in url],
)
async def test_client_refuses_every_static_case_without_connecting(url: str, reason: str) -> None:
    async with outbound_client(make_settings(allow_private=False)) as client:
        with pytest.raises(URLRefused) as refused:
            await client.get(url)
    assert reason in str(refused.value)
    # callers can say which request was refused
    assert refused.value.request.url.path == httpx.URL(url).path


async def test_client_never_sends_an_octal_address() -> None:
    # httpx itself rejects 0177.0.0.1 as a URL; check_url names it loopback (above).
    async with outbound_client(make_settings(allow_private=False)) as client:
        with pytest.raises(httpx.InvalidURL):
            await client.get("http://0177.0.0.1/a.jpg")


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"]
)
async def test_a_live_loopback_server_gets_nothing(server: LoopbackServer, host: str) -> None:
    async with outbound_client(make_settings(allow_private=False)) as client:
        with pytest.raises(URLRefused, match="loopback"):
            await client.get(f"http://{host}:{server.port}/img")
    assert server.requests == []


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"]
)
async def test_allow_private_reaches_the_loopback_server(server: LoopbackServer, host: str) -> None:
    async with outbound_client(make_settings(allow_private=True)) as client:
        response = await client.get(f"http://{host}:{server.port}/img")
    assert response.status_code == 200
    assert response.content == b"image bytes"


async def test_the_url_goes_out_as_it_was_encoded(server: LoopbackServer) -> None:
    # Signed URLs (CDN tokens, HMACs of the exact path) break if a client requotes them.
    raw = "/img%2Fa/%7Eb%41.jpg?x=1%2B2&y=a+b&z=%7E&s=abc%3D%3D&"
    server.add(raw.split("?")[0], Response(b"signed"))
    async with outbound_client(make_settings(allow_private=True)) as client:
        response = await client.get(server.url(raw))
    assert response.content == b"signed"
    assert server.requests[-1].path == raw


async def test_allow_private_still_refuses_credentials(server: LoopbackServer) -> None:
    async with outbound_client(make_settings(allow_private=True)) as client:
        with pytest.raises(URLRefused, match="credentials"):
            await client.get(f"http://user:pass@127.0.0.1:{server.port}/img")
    assert server.requests == []


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["10.0.0.7"], "internal.test resolves to a private address"),
        (["169.254.169.254"], "resolves to a link-local address"),
        (["::1"], "resolves to a loopback address"),
        (["::ffff:192.168.0.3"], "resolves to a private address"),
        # one refused answer refuses the host, even next to a public one
        (["93.184.215.14", "10.0.0.7"], "resolves to a private address"),
    ],
)
async def test_a_name_that_resolves_to_a_refused_address_is_refused(
    answers: list[str], reason: str
) -> None:
    resolver = ScriptedResolver({"internal.test": [answers]})
    client = outbound_client(make_settings(allow_private=False), guard=Guard(resolver=resolver))
    async with client:
        with pytest.raises(URLRefused) as refused:
            await client.get("https://internal.test/a.jpg")
    assert reason in str(refused.value)
    for answer in answers:  # the internal address itself is never told to the client
        assert answer not in str(refused.value) or answer == "93.184.215.14"
    assert resolver.calls == ["internal.test"]


async def test_a_name_that_does_not_resolve_says_so() -> None:
    async def unknown(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    client = outbound_client(make_settings(allow_private=False), guard=Guard(resolver=unknown))
    async with client:
        with pytest.raises(httpx.ConnectError) as failed:
            await client.get("https://nowhere.test/a.jpg")
    assert "cannot resolve nowhere.test: Name or service not known" in str(failed.value)


async def test_real_dns_for_localhost_is_checked_at_connect_time(server: LoopbackServer) -> None:
    # The resolver itself, below the static URL check: the system resolver's answer for
    # localhost (127.0.0.1 and maybe ::1) is refused before any connection.
    resolver = GuardedResolver(Guard.for_settings(allow_private=False))
    with pytest.raises(URLRefused, match="localhost resolves to a loopback address"):
        await resolver.resolve("localhost", server.port)
    assert server.requests == []


@pytest.mark.parametrize(
    ("addr_info", "reason"),
    [
        ((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)), "loopback"),
        ((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)), "link-local"),
        ((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", 80, 0, 0)), "private"),
    ],
)
def test_the_dialled_address_is_checked_last(addr_info: Any, reason: str) -> None:
    # Below the resolver: what the connector is about to dial, whoever chose it.
    open_socket = checked_socket(Guard.for_settings(allow_private=False))
    with pytest.raises(PermissionError, match=reason):
        open_socket(addr_info)
    allowed = checked_socket(Guard.for_settings(allow_private=True))(addr_info)
    allowed.close()


async def test_the_connector_dials_through_the_check(server: LoopbackServer) -> None:
    # A policy that lets the test server pass once only: the resolver's check passes, so
    # the refusal can only come from the dial-time check, which the client must use.
    passes = [TEST_SERVER]

    def once(address: IPAddress) -> str | None:
        if address in passes:
            passes.remove(address)
            return None
        return "refused at dial time"

    guard = Guard(policy=once, resolver=ScriptedResolver({"once.test": [["127.0.0.1"]]}))
    async with outbound_client(make_settings(allow_private=False), guard=guard) as client:
        with pytest.raises(httpx.ConnectError, match="refused at dial time"):
            await client.get(f"http://once.test:{server.port}/img")
    assert server.requests == []


async def test_connects_to_the_address_it_checked(server: LoopbackServer) -> None:
    # A rebinding name: first answer the (stand-in) public server, then cloud metadata.
    resolver = ScriptedResolver({"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
    guard = Guard(policy=server_is_public, resolver=resolver)
    url = f"http://rebind.test:{server.port}/img"

    async with outbound_client(make_settings(allow_private=False), guard=guard) as client:
        response = await client.get(url)
    # rebind.test exists in no DNS: reaching the server means the connection went to the
    # address that was checked, and the resolver was asked once, not again at connect.
    assert response.content == b"image bytes"
    assert resolver.calls == ["rebind.test"]
    assert server.requests[0].headers["Host"] == f"rebind.test:{server.port}"

    async with outbound_client(make_settings(allow_private=False), guard=guard) as client:
        with pytest.raises(URLRefused, match="rebind.test resolves to a link-local address"):
            await client.get(url)
    assert resolver.calls == ["rebind.test", "rebind.test"]
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is link-local"),
        ("http://127.0.0.2:{port}/secret", "address 127.0.0.2 is loopback"),
        ("http://0x7f000002:{port}/secret", "loopback"),
        ("http://[::1]:{port}/secret", "loopback"),
        ("http://internal.test:{port}/secret", "internal.test resolves to a private address"),
        ("http://user:pw@127.0.0.1:{port}/secret", "credentials"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://127.0.0.1:{port}/secret", "scheme 'gopher' is not allowed"),
    ],
)
async def test_every_redirect_hop_is_checked(
    server: LoopbackServer, location: str, reason: str
) -> None:
    server.add("/secret", Response(b"internal data"))
    start = server.add(
        "/start", Response(status=302, headers={"Location": location.format(port=server.port)})
    )
    guard = Guard(
        policy=server_is_public, resolver=ScriptedResolver({"internal.test": [["10.1.2.3"]]})
    )
    async with outbound_client(make_settings(allow_private=False), guard=guard) as client:
        with pytest.raises(URLRefused) as refused:
            await client.get(start)
    assert reason in str(refused.value)
    assert [r.path for r in server.requests] == ["/start"]


async def test_a_redirect_to_an_allowed_host_is_followed(server: LoopbackServer) -> None:
    start = server.add("/start", Response(status=302, headers={"Location": server.url("/img")}))
    guard = Guard(policy=server_is_public)
    async with outbound_client(make_settings(allow_private=False), guard=guard) as client:
        response = await client.get(start)
    assert response.content == b"image bytes"
    assert [r.path for r in server.requests] == ["/start", "/img"]


def redirect_chain(server: LoopbackServer, redirects: int) -> str:
    """A URL that redirects `redirects` times on the server before answering an image."""
    prefix = f"/chain{redirects}"
    for hop in range(redirects):
        next_hop = {"Location": f"{prefix}/{hop + 1}"}
        server.add(f"{prefix}/{hop}", Response(status=302, headers=next_hop))
    server.add(f"{prefix}/{redirects}", Response(b"image bytes"))
    return server.url(f"{prefix}/0")


async def test_redirects_are_followed_up_to_max_redirects(server: LoopbackServer) -> None:
    settings = make_settings(allow_private=True)
    async with outbound_client(settings) as client:
        response = await client.get(redirect_chain(server, settings.max_redirects))
        assert response.content == b"image bytes"
        with pytest.raises(httpx.TooManyRedirects):
            await client.get(redirect_chain(server, settings.max_redirects + 1))


async def test_cookies_set_by_one_response_are_never_sent_back(server: LoopbackServer) -> None:
    """One stranger's server must not plant cookies that later requests (for other
    users' images or webhooks to the same host) carry back."""
    set_cookie = {"Set-Cookie": "session=planted; Path=/"}
    url = server.add("/planting", Response(b"x", headers=set_cookie))
    async with outbound_client(make_settings(allow_private=True)) as client:
        await client.get(url)
        await client.get(url)
    second = server.requests_to("/planting")[1]
    assert "cookie" not in {name.lower() for name in second.headers}


async def test_a_server_that_hangs_up_is_not_a_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def hang_up() -> None:
            with contextlib.suppress(OSError):  # until the listener closes
                while True:  # every time: a client may retry an idempotent request
                    connection, _ = listener.accept()
                    connection.recv(65536)
                    connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        async with outbound_client(make_settings(allow_private=True)) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="disconnected"):
                await client.get(f"http://127.0.0.1:{listener.getsockname()[1]}/img")


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]  # closed below: nothing listens there any more
    async with outbound_client(make_settings(allow_private=True)) as client:
        with pytest.raises(httpx.ConnectError, match="Connect call failed|refused"):
            await client.get(f"http://127.0.0.1:{port}/img")


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def cut_short() -> None:
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this")
                connection.close()

        threading.Thread(target=cut_short, daemon=True).start()
        async with outbound_client(make_settings(allow_private=True)) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"http://127.0.0.1:{listener.getsockname()[1]}/img")


async def test_tls_certificates_are_verified() -> None:
    """After the switch of HTTP stacks: a certificate that no trusted CA issued is
    refused (and with it any TLS interception a stranger's network might try)."""
    issuer = trustme.CA()  # a CA of the test's own, which no system trusts
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issuer.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve_tls() -> None:
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(65536)

        threading.Thread(target=serve_tls, daemon=True).start()
        url = f"https://localhost:{listener.getsockname()[1]}/img"
        async with outbound_client(make_settings(allow_private=True)) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)
