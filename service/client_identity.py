"""Who is calling: the names of a verified client certificate, the allowlist that admits
some of them (FACEGATE_TLS_CLIENT_ALLOWED), and the peer address of an anonymous call.

No gRPC here: the names come as gRPC's auth-context mapping (property -> values), which
`service.tls` reads off a call, so this module stays testable and cheap to import (the
settings validate the allowlist when they load).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Allowlist entries name a subject alternative name by type, as openssl writes them.
# gRPC exposes each type under its own auth-context property.
SAN_PROPERTIES = {
    "DNS": "peer_dns",
    "URI": "peer_uri",
    "EMAIL": "peer_email",
    "IP": "peer_ip",
}
SUBJECT_PROPERTY = "x509_subject"
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


class AllowlistError(ValueError):
    """An allowlist entry that names nothing a certificate can carry."""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def normalised_subject(subject: str) -> tuple[str, ...]:
    """A distinguished name as a sorted tuple of `TYPE=value` parts, attribute types upper
    case: `CN=alice,O=acme` and `O=acme, CN=alice` (gRPC writes the RDNs in reverse) match."""
    parts = []
    for part in _UNESCAPED_COMMA.split(subject):
        kind, sep, value = part.partition("=")
        if not sep or not kind.strip() or not value.strip():
            raise AllowlistError(f"{subject!r} is not a distinguished name (TYPE=value,...)")
        parts.append(f"{kind.strip().upper()}={value.strip()}")
    return tuple(sorted(parts))


@dataclass(frozen=True)
class ClientNames:
    """The verified names of a caller's certificate (empty without mutual TLS)."""

    subject: str | None = None
    sans: tuple[tuple[str, str], ...] = ()  # (type, value), e.g. ("DNS", "probe.acme")

    @classmethod
    def from_auth_context(cls, auth: Mapping[str, Sequence[bytes | str]]) -> ClientNames:
        subjects = auth.get(SUBJECT_PROPERTY) or ()
        sans = tuple(
            (kind, _text(value))
            for kind, prop in SAN_PROPERTIES.items()
            for value in auth.get(prop) or ()
        )
        return cls(_text(subjects[0])[:256] if subjects else None, sans)

    def describe(self) -> str:
        names = [f"subject {self.subject!r}" if self.subject else "no subject"]
        names += [f"{kind}:{value}" for kind, value in self.sans]
        return ", ".join(names)


class ClientAllowlist:
    """FACEGATE_TLS_CLIENT_ALLOWED: a certificate is admitted when its subject equals a
    distinguished-name entry (`CN=batch,O=acme`, in any RDN order) or one of its SANs
    equals a typed entry (`DNS:`, `URI:`, `email:`, `IP:`). Empty: every certificate the
    client CA issued is admitted."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = [str(e) for e in entries]
        self._subjects: set[tuple[str, ...]] = set()
        self._sans: set[tuple[str, str]] = set()
        for entry in self.entries:
            text = entry.strip()
            kind, sep, value = text.partition(":")
            if sep and kind.upper() in SAN_PROPERTIES:
                if not value:
                    raise AllowlistError(f"{entry!r} names no {kind} value")
                self._sans.add((kind.upper(), value))
            elif "=" in text:
                self._subjects.add(normalised_subject(text))
            else:
                raise AllowlistError(
                    f"{entry!r} is neither a subject (CN=...,O=...) nor a typed SAN "
                    f"({', '.join(k + ':' for k in SAN_PROPERTIES)})"
                )

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, names: ClientNames) -> bool:
        if not self.entries:
            return True
        if names.subject is not None:
            try:
                if normalised_subject(names.subject) in self._subjects:
                    return True
            except AllowlistError:
                pass  # an unparsable subject matches no subject entry; SANs may still
        return any((kind, value) in self._sans for kind, value in names.sans)


def peer_address(peer: str | None) -> str | None:
    """gRPC's peer string without the port: `ipv4:10.0.0.7:5123` -> `ipv4:10.0.0.7`,
    `ipv6:[::1]:5123` -> `ipv6:[::1]`; other forms (unix sockets) unchanged."""
    if not peer:
        return None
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit() and host not in ("ipv4", "ipv6"):
            return host
    return peer
