"""The SSRF rail's rules: the host names refused whatever they resolve to, and the addresses
that are not public."""

from __future__ import annotations

import pytest

from director.config import Settings
from director.playbooks import rails
from director.playbooks.model import Server

FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS=true allows it"


# --- the name rules and the address kinds (pure functions) -----------------------------------

def fullwidth(text: str) -> str:
    """``text`` in fullwidth letters and digits, which IDNA (and so getaddrinfo) folds back."""
    return "".join(chr(ord(char) + 0xFEE0) if char.isalnum() else char for char in text)


REFUSED_NAMES = {
    # IP addresses, in every spelling a resolver (inet_aton) or a browser reads as one
    "127.0.0.1": "not an IP address", "127.1": "not an IP address",
    "0x7f.1": "not an IP address", "0x7F.0.0.1": "not an IP address",
    "2130706433": "not an IP address", "0177.0.0.1": "not an IP address",
    "1.2.3.4.": "not an IP address", "8.8.8.8": "not an IP address",
    "::1": "not an IP address", "::ffff:127.0.0.1": "not an IP address",
    "fe80::1%25eth0": "not an IP address", fullwidth("127.0.0.1"): "not an IP address",
    "example.0x1": "not an IP address", "host.123": "not an IP address",
    # this machine and its local network, whatever they resolve to
    "localhost": "names this machine", "localhost.": "names this machine",
    "LocalHost": "names this machine", fullwidth("localhost"): "names this machine",
    "foo.localhost": "names this machine", "foo.localhost.": "names this machine",
    "printer.local": "multicast DNS", "printer.local.": "multicast DNS",
    "db.internal": ".internal", "nas.home.arpa": ".home.arpa",
    # not names at all (glibc reads "127.0.0.1 x" as 127.0.0.1, hence an address above)
    "": "not a valid host name", "a..b": "not a valid host name",
    "127.0.0.1 x": "not an IP address", "%6c%6focalhost": "not a valid host name",
}
ACCEPTED_NAMES = ["mcp.example.com", "mcp.example.com.", "MCP.Example.COM", "1password.com",
                  "localhost.example.com", "local.example.com", "my-localhost.dev",
                  "xn--bcher-kva.example", "bücher.example", "_srv.example.org", "123.example",
                  "internal.example.com", "x.invalid"]


@pytest.mark.parametrize("host", REFUSED_NAMES)
def test_names_refused_whatever_they_resolve_to(host: str) -> None:
    refusal = rails.name_refusal(host)
    assert refusal is not None and REFUSED_NAMES[host] in refusal and refusal.endswith(FLAG)


@pytest.mark.parametrize("host", ACCEPTED_NAMES)
def test_names_left_to_their_addresses(host: str) -> None:
    assert rails.name_refusal(host) is None


ADDRESS_KINDS = {
    "127.0.0.1": "a loopback address", "127.0.1.1": "a loopback address",
    "::1": "a loopback address", "0.0.0.0": "the unspecified address",  # noqa: S104
    "::": "the unspecified address", "169.254.169.254": "a link-local address",
    "fe80::1%eth0": "a link-local address", "10.1.2.3": "a private address",
    "172.16.0.1": "a private address", "192.168.1.1": "a private address",
    "100.64.0.1": "a private address", "fd00::1": "a private address",
    "224.0.0.1": "a multicast address", "233.252.0.1": "a multicast address",
    "ff0e::1": "a multicast address", "255.255.255.255": "the broadcast address",
    "192.0.2.1": "a reserved address", "198.18.0.1": "a reserved address",
    "240.0.0.1": "a reserved address", "192.0.0.8": "a reserved address",
    "2001:db8::1": "a reserved address", "fec0::1": "a reserved address",
    "::7f00:1": "a reserved address", "2001::1": "a reserved address",
    "64:ff9b:1::1": "a reserved address",
    # IPv6 forms that reach an IPv4 address are judged by that address
    "::ffff:127.0.0.1": "a loopback address", "::ffff:10.0.0.1": "a private address",
    "2002:7f00:1::": "a loopback address", "2002:a9fe:a9fe::1": "a link-local address",
    "64:ff9b::7f00:1": "a loopback address", "64:ff9b::a00:1": "a private address",
}
PUBLIC_ADDRESSES = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", ADDRESS_KINDS)
def test_non_public_addresses(address: str) -> None:
    assert rails.address_kind(address) == ADDRESS_KINDS[address]
    assert not rails.address_is_public(address)


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses(address: str) -> None:
    assert rails.address_kind(address) is None and rails.address_is_public(address)


def test_write_time_check_uses_the_same_rules() -> None:
    settings = Settings()
    for url, fragment in (
        ("https://0x7f.1/mcp", "must name a host, not an IP address (0x7f.1)"),
        ("https://[::ffff:127.0.0.1]:8443/mcp", "not an IP address (::ffff:127.0.0.1)"),
        ("https://2130706433/mcp", "not an IP address (2130706433)"),
        ("https://localhost./mcp", "localhost. names this machine"),
        ("https://api.localhost/mcp", "api.localhost names this machine"),
    ):
        with pytest.raises(rails.RailViolation) as refused:
            rails.check_server_sync(settings, Server("s", "http", url=url))
        message = refused.value.fields["url"]
        assert fragment in message and message.endswith(FLAG), message
        rails.check_server_sync(Settings(allow_insecure_http_servers=True),
                                Server("s", "http", url=url))
