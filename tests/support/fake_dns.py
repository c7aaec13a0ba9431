"""A resolver for names the tests make up: ``socket.getaddrinfo`` answers
them from a table, and every other name as the system would. Lets a test
give a name loopback addresses, NXDOMAIN or a silent resolver without
touching the machine's DNS or leaving loopback."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

#: Addresses the name has, or the getaddrinfo error code it fails with.
Answer = Sequence[str] | int

_MESSAGES = {
    socket.EAI_NONAME: "Name or service not known",
    socket.EAI_AGAIN: "Temporary failure in name resolution",
    socket.EAI_FAIL: "Non-recoverable failure in name resolution",
}


@dataclass
class FakeDns:
    #: name -> its answers, one per lookup; the last one repeats.
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def set(self, name: str, *answers: Answer) -> None:
        self.answers[name] = list(answers)

    def answer(self, name: str) -> Answer:
        self.asked.append(name)
        queued = self.answers[name]
        return queued.pop(0) if len(queued) > 1 else queued[0]


def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    dns = FakeDns()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.rstrip(".") if isinstance(host, str) else host
        if name not in dns.answers:
            return real(host, port, *args, **kwargs)
        answer = dns.answer(name)
        if isinstance(answer, int):
            raise socket.gaierror(answer, _MESSAGES.get(answer, "resolver error"))
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port),
            )
            for address in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return dns
