"""URLs the API must refuse with a 400 for a fileUrl and a webhook alike:
spellings of this machine, of addresses inside the network, and hosts that
are not well-formed (issue #9 and the classes its examples stand for)."""

from __future__ import annotations

INTERNAL_SPELLINGS = [
    # Issue #9, verbatim.
    "http://[::127.0.0.1]/",
    "http://[::ffff:0:127.0.0.1]/",
    "http://[64:ff9b:1::7f00:1]/",
    "http://127.0.0.1./",
    "http://localhost/",
    # Names of this machine (RFC 6761), any case, trailing dot, IDNA.
    "http://localhost./",
    "http://LocalHost:8080/",
    "http://hooks.localhost/",
    "http://a.b.LOCALHOST./x",
    "http://xn--mi7cdqncpe6aj/",  # fullwidth "localhost" as an A-label
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",  # fullwidth
    "http://%6c%6fcalhost/",
    "http://127.0.0.1%2e/",
    # IPv6 forms carrying an internal IPv4 address.
    "http://[::7f00:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:0:a00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b:1:0:1::a00:1]/",
    "http://[2002:7f00:1::1]/",
    "http://[2002:a9fe:a9fe:1::1]/",
    "http://[2001:0:7f00:1:8000:63bf:f7f7:fbfb]/",  # Teredo, server 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
    "http://[2001:4860:1::5efe:a9fe:a9fe]/",  # ISATAP
    "http://[2001:4860:1::200:5efe:7f00:1]/",
    # IPv6 outside the global unicast space.
    "http://[::]/",
    "http://[fe80::1%25eth0]/",
    "http://[::1%25lo]/",
    "http://[ff02::1]/",
    "http://[100::1]/",
    "http://[2001:db8::1]/",
    "http://[3fff::1]/",
    "http://[5f00::1]/",
    # Legacy IPv4 spellings, with and without a trailing dot.
    "http://2130706433./",
    "http://0177.0.0.1./",
    "http://0x7f.1/",
    "http://127.1/",
    "http://127.1.:8080/",
    "http://0/",
    "http://192.0.0.8/",
    "http://192.0.0.171/",
    "http://198.18.0.1/",
    "http://255.255.255.255/",
    # Hosts that are not an address nor a well-formed name.
    "http://1.2.3.4.5/",
    "http://127.0.0.1../",
    "http://0x7f.0.0.0x1.0x2/",
    "http://[v1.localhost]/",
    "http://[v1.example.com]/",
    "http://a@127.0.0.1/",
    "http://127.0.0.1\\@example.com/",
    "http://-bad-.example/",
    "http://under_score.example/",
    f"http://{'a' * 60}.{'b' * 60}.{'c' * 60}.{'d' * 60}.{'e' * 10}/",
]
