"""Every limit on a stored file field holds on every path that writes it:
creation, and each update operation (set, add, remove), whose result is
checked as a creation is. A refused update changes no file of the request."""

from __future__ import annotations

from typing import Any

import pytest

from segq.api.schemas import MAX_EXTERNAL_ID_LENGTH, MAX_METADATA_BYTES, MAX_METADATA_PAIRS
from tests.support.tenants import Tenant

FULL = {f"k{n}": "v" for n in range(MAX_METADATA_PAIRS)}


def _create(tenant: Tenant, **fields: Any) -> Any:
    return tenant.client.post(
        tenant.url("/files"), json={"name": "a.png", **fields}, headers=tenant.headers
    )


def _update(tenant: Tenant, *items: dict[str, Any]) -> Any:
    return tenant.client.post(
        tenant.url("/files/update"), json={"items": list(items)}, headers=tenant.headers
    )


def _shown(tenant: Tenant, file_id: int) -> Any:
    return tenant.client.get(tenant.url(f"/files/{file_id}"), headers=tenant.headers).json


def _refused(response: Any, field: str, says: str) -> None:
    assert response.status_code == 400, response.json
    message = response.json["error"]["message"]
    assert message.startswith(f"{field}:") and says in message, message


def test_metadata_pairs_are_bounded_after_every_operation(tenant: Tenant) -> None:
    file_id = _create(tenant, metadata=FULL).json["id"]
    metadata = "items[0].update.metadata"

    def change(operations: dict[str, Any]) -> Any:
        return _update(tenant, {"id": file_id, "update": {"metadata": operations}})

    # The probe's case: add, each within bounds, pushing the file past them.
    _refused(change({"add": {"new": "v"}}), metadata, f"at most {MAX_METADATA_PAIRS} items")
    _refused(
        change({"add": {f"n{n}": "v" for n in range(MAX_METADATA_PAIRS)}}),
        metadata,
        f"at most {MAX_METADATA_PAIRS} items",
    )
    too_many = {f"s{n}": "v" for n in range(MAX_METADATA_PAIRS + 1)}
    _refused(change({"set": too_many}), f"{metadata}.set", f"at most {MAX_METADATA_PAIRS} items")
    _refused(
        change({"remove": [f"k{n}" for n in range(MAX_METADATA_PAIRS + 1)]}),
        f"{metadata}.remove",
        f"at most {MAX_METADATA_PAIRS} items",
    )
    assert _shown(tenant, file_id)["metadata"] == FULL
    # Within bounds once applied: a key replaced, or one removed for one added.
    assert change({"add": {"k0": "w"}}).status_code == 200
    assert change({"remove": ["k1"], "add": {"new": "v"}}).status_code == 200
    assert len(_shown(tenant, file_id)["metadata"]) == MAX_METADATA_PAIRS
    assert change({"set": {"only": "one"}}).status_code == 200
    assert _shown(tenant, file_id)["metadata"] == {"only": "one"}


def test_metadata_bytes_are_bounded_after_every_operation(tenant: Tenant) -> None:
    # Two-byte characters: the bound is on UTF-8 bytes, not characters.
    half = {"a": "é" * (MAX_METADATA_BYTES // 4 - 1), "b": "é" * (MAX_METADATA_BYTES // 4 - 1)}
    file_id = _create(tenant, metadata=half).json["id"]
    over = {"a": "é" * (MAX_METADATA_BYTES // 2)}
    _refused(_create(tenant, metadata=over), "metadata", "bytes")
    metadata = "items[0].update.metadata"

    def change(operations: dict[str, Any]) -> Any:
        return _update(tenant, {"id": file_id, "update": {"metadata": operations}})

    _refused(change({"add": {"c": "x" * 8}}), metadata, "bytes")
    _refused(change({"set": over}), f"{metadata}.set", "bytes")
    _refused(change({"add": {"a": "é" * (MAX_METADATA_BYTES // 4 + 1)}}), metadata, "bytes")
    assert _shown(tenant, file_id)["metadata"] == half
    assert change({"remove": ["b"], "add": {"c": "x" * 8}}).status_code == 200
    assert sorted(_shown(tenant, file_id)["metadata"]) == ["a", "c"]


@pytest.mark.parametrize(
    ("field", "update", "says"),
    [
        ("metadata.add", {"metadata": {"add": {"k" * 129: "v"}}}, "at most 128 characters"),
        ("metadata.set", {"metadata": {"set": {"k" * 129: "v"}}}, "at most 128 characters"),
        ("name.set", {"name": {"set": "n" * (MAX_EXTERNAL_ID_LENGTH + 1)}}, "at most 255"),
        (
            "externalId.set",
            {"externalId": {"set": "e" * (MAX_EXTERNAL_ID_LENGTH + 1)}},
            "at most 255",
        ),
        ("source.set", {"source": {"set": "s" * 129}}, "at most 128"),
        ("directory.set", {"directory": {"set": "/" + "d" * 512}}, "at most 512"),
    ],
)
def test_each_field_limit_holds_on_update_as_on_create(
    tenant: Tenant, field: str, update: dict[str, Any], says: str
) -> None:
    kept = _create(tenant, externalId="kept").json
    file_id = _create(tenant).json["id"]
    before = _shown(tenant, file_id)
    # The refused change is the second item: the first is not applied either.
    response = _update(
        tenant,
        {"id": kept["id"], "update": {"name": {"set": "renamed.png"}}},
        {"id": file_id, "update": update},
    )
    root = field.split(".", 1)[0]
    assert response.status_code == 400, response.json
    message = response.json["error"]["message"]
    assert message.startswith(f"items[1].update.{root}") and says in message, message
    assert _shown(tenant, file_id) == before
    assert _shown(tenant, kept["id"])["name"] == "a.png"
    creation = {
        "metadata": {"k" * 129: "v"},
        "name": "n" * (MAX_EXTERNAL_ID_LENGTH + 1),
        "externalId": "e" * (MAX_EXTERNAL_ID_LENGTH + 1),
        "source": "s" * 129,
        "directory": "/" + "d" * 512,
    }
    refused = tenant.client.post(
        tenant.url("/files"),
        json={"name": "a.png", root: creation[root]},
        headers=tenant.headers,
    )
    assert refused.status_code == 400 and root in refused.json["error"]["message"]
