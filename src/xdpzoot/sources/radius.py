"""RADIUS on the wire: Accounting-Request (RFC 2866) and CoA/Disconnect-Request (RFC 5176)
decoded into plain values, and the replies encoded.

pyrad does the packet codec, the Request Authenticator and the Message-Authenticator
(HMAC-MD5); the dictionary shipped beside this module (``radius.dictionary``) names the
attributes read here. Before pyrad sees a datagram, :func:`check_frame` walks it: a packet
shorter than its Length field, an attribute that overruns the packet or is shorter than its
own header, is refused (pyrad would cut such an attribute short silently). Any problem is a
:class:`Drop` naming its cause: the listener answers nothing and counts the cause.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pyrad import packet as rp
from pyrad import tools
from pyrad.dictionary import Dictionary

from xdpzoot.sources.subscribers import overlaps_v4mapped

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ACCOUNTING_REQUEST = rp.AccountingRequest   # 4
DISCONNECT_REQUEST = rp.DisconnectRequest   # 40
COA_REQUEST = rp.CoARequest                 # 43
MAX_LENGTH = 4096   # RFC 2865 section 3: the largest packet
HEADER = 20
MESSAGE_AUTHENTICATOR = 80
# The shortest prefixes a session may claim: anything wider would take a whole network.
MIN_PREFIXLEN = {4: 16, 6: 32}

STATUS = {1: "start", 2: "stop", 3: "interim", 7: "on", 8: "off"}

# RFC 5176 section 3.5: Error-Cause values this server sends.
UNSUPPORTED_ATTRIBUTE = 401
MISSING_ATTRIBUTE = 402
NAS_MISMATCH = 403
INVALID_ATTRIBUTE_VALUE = 407
SESSION_NOT_FOUND = 503
RESOURCES_UNAVAILABLE = 506

# Attributes a CoA or Disconnect-Request may carry here (anything else: NAK 401).
_SELECTORS = ("Acct-Session-Id", "User-Name", "Framed-IP-Address", "Framed-IPv6-Prefix",
              "Delegated-IPv6-Prefix", "Framed-IPv6-Address")
_NAS = ("NAS-IP-Address", "NAS-IPv6-Address", "NAS-Identifier")
_RATES = ("WISPr-Bandwidth-Max-Up", "WISPr-Bandwidth-Max-Down", "Mikrotik-Rate-Limit",
          "Cisco-AVPair")
_COA_KNOWN = (*_SELECTORS, *_NAS, *_RATES, "Framed-IP-Netmask", "Message-Authenticator",
              "Proxy-State", "Event-Timestamp", "State", "Class", "Calling-Station-Id",
              "Called-Station-Id", "NAS-Port", "NAS-Port-Id", "Framed-Interface-Id")


class Drop(Exception):
    """The request is not answered; ``cause`` is the counter it goes to."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


class Nak(Exception):
    """A CoA/Disconnect-Request answered with a NAK carrying this Error-Cause."""

    def __init__(self, cause: int, why: str):
        super().__init__(why)
        self.error_cause = cause


@cache
def dictionary() -> Dictionary:
    """The attribute dictionary shipped with the package."""
    return Dictionary(str(Path(__file__).with_name("radius.dictionary")))


@dataclass(frozen=True)
class Accounting:
    """One Accounting-Request, as the session table needs it."""

    status: str   # "start" | "interim" | "stop" | "on" | "off" | "other"
    nas: str      # NAS-Identifier, NAS-IP-Address or NAS-IPv6-Address ("" = none given)
    session_id: str
    user: str
    cls: tuple[bytes, ...]   # Class, verbatim
    networks: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class Coa:
    """One CoA-Request or Disconnect-Request: which sessions, and the rates (None: as is)."""

    disconnect: bool
    nas: str
    session_id: str
    user: str
    networks: tuple[IPNetwork, ...]
    up_kbps: int | None = None
    down_kbps: int | None = None


# --- frames ---------------------------------------------------------------------------------


def check_frame(data: bytes) -> int:
    """The Length of a well-formed packet; raise Drop("malformed") otherwise.

    Octets past Length are padding (RFC 2865 section 3); a packet shorter than Length, a
    Length out of 20..4096, an attribute shorter than 2 octets or running past Length, and a
    Message-Authenticator that is not 16 octets are malformed.
    """
    if len(data) < HEADER:
        raise Drop("malformed")
    length = struct.unpack_from("!H", data, 2)[0]
    if not HEADER <= length <= MAX_LENGTH or length > len(data):
        raise Drop("malformed")
    pos = HEADER
    while pos < length:
        if pos + 2 > length:
            raise Drop("malformed")
        kind, alen = data[pos], data[pos + 1]
        if alen < 2 or pos + alen > length:
            raise Drop("malformed")
        if kind == MESSAGE_AUTHENTICATOR and alen != 18:
            raise Drop("malformed")
        pos += alen
    return length


def _packet(cls: type[rp.Packet], data: bytes, secret: bytes) -> rp.Packet:
    """pyrad's packet of a checked frame; a decoding error is Drop("malformed")."""
    try:
        return cls(secret=secret, dict=dictionary(), packet=data)
    except (rp.PacketError, struct.error, KeyError, ValueError, TypeError, IndexError):
        raise Drop("malformed") from None


def verify(data: bytes, secret: bytes, require_ma: bool) -> rp.Packet:
    """The request in ``data`` with its authenticators checked against ``secret``.

    Accounting, CoA and Disconnect requests all carry an MD5 Request Authenticator over
    the packet and the secret; a Message-Authenticator, when present (or required), must be
    the HMAC-MD5 of the packet. Causes: malformed, code, authenticator,
    message_authenticator (wrong or missing when required).
    """
    length = check_frame(data)
    data = data[:length]
    code = data[0]
    if code == ACCOUNTING_REQUEST:
        pkt = _packet(rp.AcctPacket, data, secret)
        ok = pkt.VerifyAcctRequest()
    elif code in (COA_REQUEST, DISCONNECT_REQUEST):
        pkt = _packet(rp.CoAPacket, data, secret)
        ok = pkt.VerifyCoARequest()
    else:
        raise Drop("code")
    if not ok:
        raise Drop("authenticator")
    if pkt.message_authenticator:
        if not pkt.verify_message_authenticator():
            raise Drop("message_authenticator")
    elif require_ma:
        raise Drop("message_authenticator")
    return pkt


# --- attributes -----------------------------------------------------------------------------
# Values are read from the attributes pyrad split out (its raw octets by code), decoded by
# pyrad's codec per the dictionary's type; addresses and prefixes are built from the octets
# directly (a string round trip through ipaddress costs more than the rest of a request).


@cache
def _attr(name: str):
    """(the packet's key for ``name``: code or (vendor, code), its dictionary entry)."""
    d = dictionary()
    return d.attrindex.GetForward(name), d.attributes[name]


def _raw(pkt: rp.Packet, name: str) -> list[bytes]:
    """The octets of each instance of attribute ``name``."""
    return dict.get(pkt, _attr(name)[0]) or []


def _values(pkt: rp.Packet, name: str) -> list:
    """Decoded values of attribute ``name`` ([] if absent); a bad value is a Drop. Enumerated
    integers stay integers."""
    raw = dict.get(pkt, _attr(name)[0])
    if not raw:
        return []
    kind = _attr(name)[1].type
    try:
        return [tools.DecodeAttr(kind, v) for v in raw]
    except (ValueError, TypeError, struct.error):
        raise Drop("invalid_attribute") from None


def _one(pkt: rp.Packet, name: str, default=None):
    got = _values(pkt, name)
    return got[0] if got else default


def _text(value) -> str:
    """A string attribute as text: non-UTF-8 octets are refused."""
    if not isinstance(value, str) or not value.isprintable():
        raise Drop("invalid_attribute")
    return value


def nas_identity(pkt: rp.Packet) -> str:
    """What names the NAS in the packet: NAS-Identifier, else NAS-IP(v6)-Address, else ""."""
    ident = _one(pkt, "NAS-Identifier")
    if ident is not None:
        return _text(ident)
    for name, family, size in (("NAS-IP-Address", socket.AF_INET, 4),
                               ("NAS-IPv6-Address", socket.AF_INET6, 16)):
        raw = _raw(pkt, name)
        if raw:
            if len(raw[0]) != size:
                raise Drop("invalid_attribute")
            return socket.inet_ntop(family, raw[0])
    return ""


_NETWORK = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
_BITS = {4: 32, 6: 128}


def _network(version: int, value: int, plen: int) -> IPNetwork:
    """A session address or prefix, host bits cleared; one wider than MIN_PREFIXLEN, the
    unspecified address, or IPv6 in ::ffff:0:0/96 is refused."""
    bits = _BITS[version]
    if not MIN_PREFIXLEN[version] <= plen <= bits:
        raise Drop("invalid_attribute")
    value &= ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
    if value == 0 or (version == 6 and overlaps_v4mapped(value, plen)):
        raise Drop("invalid_attribute")
    return _NETWORK[version]((value, plen))


def _prefixlen(mask: bytes) -> int:
    """The length of a netmask: leading ones, then zeros (a host mask is refused)."""
    if len(mask) != 4:
        raise Drop("invalid_attribute")
    m = int.from_bytes(mask, "big")
    plen = 32 - ((~m & 0xFFFF_FFFF).bit_length())
    if m != (0xFFFF_FFFF << (32 - plen)) & 0xFFFF_FFFF:
        raise Drop("invalid_attribute")
    return plen


_NOT_ASSIGNED = (0xFFFF_FFFE, 0xFFFF_FFFF, 0)   # RFC 2865 section 5.8, and 0.0.0.0


def _v6prefix(raw: bytes) -> IPNetwork:
    """An ipv6prefix (RFC 3162 section 2.3): reserved octet, length, up to 16 octets."""
    if not 2 <= len(raw) <= 18 or raw[0] != 0 or len(raw) - 2 < (raw[1] + 7) // 8:
        raise Drop("invalid_attribute")
    return _network(6, int.from_bytes(raw[2:].ljust(16, b"\0"), "big"), raw[1])


def networks(pkt: rp.Packet) -> tuple[IPNetwork, ...]:
    """The session's addresses: Framed-IP-Address (with Framed-IP-Netmask), Framed-IPv6-Prefix,
    Delegated-IPv6-Prefix, Framed-IPv6-Address. 255.255.255.254/255 in Framed-IP-Address mean
    "not assigned yet" (RFC 2865 section 5.8) and give nothing."""
    out: list[IPNetwork] = []
    masks = _raw(pkt, "Framed-IP-Netmask")
    plen = _prefixlen(masks[0]) if masks else 32
    for raw in _raw(pkt, "Framed-IP-Address"):
        if len(raw) != 4:
            raise Drop("invalid_attribute")
        value = int.from_bytes(raw, "big")
        if value not in _NOT_ASSIGNED:
            out.append(_network(4, value, plen))
    for name in ("Framed-IPv6-Prefix", "Delegated-IPv6-Prefix"):
        out.extend(map(_v6prefix, _raw(pkt, name)))
    for raw in _raw(pkt, "Framed-IPv6-Address"):
        if len(raw) != 16:
            raise Drop("invalid_attribute")
        out.append(_network(6, int.from_bytes(raw, "big"), 128))
    return tuple(dict.fromkeys(out))


def accounting(pkt: rp.Packet) -> Accounting:
    """An Accounting-Request's meaning. Start, Interim-Update and Stop need Acct-Session-Id."""
    status = _one(pkt, "Acct-Status-Type")
    if status is None:
        raise Drop("missing_attribute")
    status = STATUS.get(status, "other")
    session_id = _text(_one(pkt, "Acct-Session-Id", ""))
    if status in ("start", "interim", "stop") and not session_id:
        raise Drop("missing_attribute")
    user = _text(_one(pkt, "User-Name", ""))
    cls = tuple(_raw(pkt, "Class"))
    return Accounting(status, nas_identity(pkt), session_id, user, cls, networks(pkt))


# --- rates ----------------------------------------------------------------------------------

_UNIT = {"": 1, "k": 1000, "m": 1000_000, "g": 1000_000_000}
_MIKROTIK_RATE = re.compile(r"([0-9]{1,10})([kKmMgG]?)")   # ASCII digits only
_CISCO_RATE = re.compile(r"(?:lcp|ip):interface-config[=*]rate-limit (input|output) "
                         r"([0-9]{1,10})(?: [ -~]*)?")
MAX_KBPS = 0xFFFF_FFFF


def _kbps(bps: int) -> int:
    """Bits per second as kbps (rounded up), within a u32."""
    kbps = -(-bps // 1000)
    if kbps > MAX_KBPS:
        raise ValueError("rate too large")
    return kbps


def mikrotik_rate(text: str) -> tuple[int, int]:
    """(up, down) kbps of a Mikrotik-Rate-Limit: ``rx[/tx] [bursts ...]``, rx being what the
    router receives from the subscriber (upload); rates in bit/s with k, M or G; a missing
    tx is rx; 0 is unlimited. Only the first field (the rates) is used."""
    first = text.strip().split(" ", 1)[0]
    parts = first.split("/")
    if not 1 <= len(parts) <= 2:
        raise ValueError("not rx[/tx]")
    rates = []
    for p in parts:
        m = _MIKROTIK_RATE.fullmatch(p)
        if m is None:
            raise ValueError(f"bad rate {p!r}")
        rates.append(_kbps(int(m.group(1)) * _UNIT[m.group(2).lower()]))
    return rates[0], rates[-1]


def cisco_rate(text: str) -> tuple[str, int]:
    """("up" | "down", kbps) of ``lcp:interface-config=rate-limit input|output BPS ...``
    (input is from the subscriber: upload)."""
    m = _CISCO_RATE.fullmatch(text)
    if m is None:
        raise ValueError("not a rate-limit")
    return ("up" if m.group(1) == "input" else "down"), _kbps(int(m.group(2)))


def rates(pkt: rp.Packet) -> tuple[int | None, int | None]:
    """(up, down) kbps a CoA-Request sets (None: not set). Two different values for one
    direction, or a value that does not parse, is NAK 407; a Cisco-AVPair that is not a
    rate-limit is NAK 401."""
    got: dict[str, set[int]] = {"up": set(), "down": set()}
    try:
        for v in _values(pkt, "WISPr-Bandwidth-Max-Up"):
            got["up"].add(_kbps(v))
        for v in _values(pkt, "WISPr-Bandwidth-Max-Down"):
            got["down"].add(_kbps(v))
        for v in _values(pkt, "Mikrotik-Rate-Limit"):
            up, down = mikrotik_rate(_text(v))
            got["up"].add(up)
            got["down"].add(down)
    except (ValueError, Drop):
        raise Nak(INVALID_ATTRIBUTE_VALUE, "bad rate") from None
    for v in _values(pkt, "Cisco-AVPair"):
        try:
            way, kbps = cisco_rate(_text(v))
        except (ValueError, Drop):
            raise Nak(UNSUPPORTED_ATTRIBUTE, "Cisco-AVPair is not a rate-limit") from None
        got[way].add(kbps)
    if len(got["up"]) > 1 or len(got["down"]) > 1:
        raise Nak(INVALID_ATTRIBUTE_VALUE, "two different rates for one direction")
    return (min(got["up"]) if got["up"] else None, min(got["down"]) if got["down"] else None)


@cache
def _coa_known() -> frozenset:
    """The packet keys of the attributes a CoA/Disconnect-Request may carry."""
    return frozenset(_attr(n)[0] for n in _COA_KNOWN)


def coa(pkt: rp.Packet) -> Coa:
    """A CoA/Disconnect-Request's meaning; what cannot be honoured is a Nak."""
    known = _coa_known()
    for key in dict.keys(pkt):
        if key not in known:
            raise Nak(UNSUPPORTED_ATTRIBUTE, f"attribute {key}")
    try:
        nets = networks(pkt)
        session_id = _text(_one(pkt, "Acct-Session-Id", ""))
        user = _text(_one(pkt, "User-Name", ""))
        nas = nas_identity(pkt)
    except Drop:
        raise Nak(INVALID_ATTRIBUTE_VALUE, "bad session attribute") from None
    if not (session_id or user or nets):
        raise Nak(MISSING_ATTRIBUTE, "no session identification")
    disconnect = pkt.code == DISCONNECT_REQUEST
    up = down = None
    if not disconnect:
        up, down = rates(pkt)
        if up is None and down is None:
            raise Nak(MISSING_ATTRIBUTE, "no rate attribute")
    return Coa(disconnect, nas, session_id, user, nets, up, down)


# --- replies --------------------------------------------------------------------------------


def reply(pkt: rp.Packet, nak_cause: int | None = None) -> bytes:
    """The signed answer to a verified request: Accounting-Response, or CoA/Disconnect
    ACK, or NAK with ``nak_cause``. A request that carried a Message-Authenticator gets one
    back (the BlastRADIUS countermeasure clients expect)."""
    r = pkt.CreateReply()
    if nak_cause is not None:
        r.code = rp.DisconnectNAK if pkt.code == DISCONNECT_REQUEST else rp.CoANAK
        r.AddAttribute("Error-Cause", nak_cause)
    if pkt.message_authenticator:
        r.add_message_authenticator()
    return r.ReplyPacket()

