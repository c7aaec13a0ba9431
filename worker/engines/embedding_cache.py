"""Image embeddings kept so that an image is encoded once for every worker.

An embedding is what a promptable model's image encoder makes of one image
(SAM: a 256x64x64 tensor, seconds on a CPU; SAM 2: that and two finer
feature maps); every prompt on that image is then a cheap decode. Two tiers:

- tier 1, in each process: an LRU bounded in bytes, holding the embedding
  exactly as the encoder made it (float32);
- tier 2, shared by all workers: the object storage that holds masks, under
  ``embeddings/<model id>/<image digest>``, as float16 with a header that
  names its shape and sizes and a checksum of the payload. An entry that is
  missing, truncated, corrupt, of another shape or older than the TTL is a
  miss, and is recomputed and written again, never trusted.

Keys carry the model's identity (engine name and the checkpoint file's
SHA-256), so another checkpoint never hits, and the digest of the image as
decoded into the model's frame (pixels and shape), so a rotated or otherwise
different image never hits.

This module knows nothing of torch: an engine hands it numpy arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

from segq.storage import ObjectNotFound, ObjectStorage, StorageError

log = logging.getLogger(__name__)

#: Where shared embeddings live in object storage.
EMBEDDINGS_PREFIX = "embeddings/"
#: The first bytes of a shared entry; the digit is the format's version.
MAGIC = b"SEGQEMB1"
_HEADER_LENGTH = struct.Struct(">I")
_CHECKPOINT_CHUNK_BYTES = 1 << 20


class EmbeddingSource(StrEnum):
    """Where an item's embedding came from, as its metrics report it."""

    COMPUTED = "computed"
    LOCAL = "local"
    SHARED = "shared"


@dataclass(frozen=True)
class Embedding:
    """features: (1, C, h, w) float32, the encoder's output; original_size and
    input_size: (H, W) of the image and of it resized for the encoder;
    high_res_features: further (1, C_i, h_i, w_i) float32 maps the decoder
    also reads (SAM 2's ``high_res_feats``, finest first; SAM has none)."""

    features: npt.NDArray[np.float32]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    high_res_features: tuple[npt.NDArray[np.float32], ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes) + sum(int(a.nbytes) for a in self.high_res_features)


@dataclass(frozen=True)
class EmbeddingKey:
    """model_id: engine name and checkpoint digest; image_digest: of the
    pixels and shape of the image in the model's frame."""

    model_id: str
    image_digest: str

    @property
    def object_key(self) -> str:
        return f"{EMBEDDINGS_PREFIX}{self.model_id}/{self.image_digest}"


def checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 of the checkpoint file, hex; read once when the model loads."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        while chunk := handle.read(_CHECKPOINT_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_id(engine_name: str, checkpoint_sha256: str) -> str:
    return f"{engine_name}-{checkpoint_sha256[:32]}"


def image_digest(image: npt.NDArray[np.uint8], input_size: tuple[int, int]) -> str:
    """Of the decoded pixels, their shape and the encoder's input size:
    milliseconds even for a 12-megapixel image."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((image.shape, str(image.dtype), input_size)).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def encode_entry(embedding: Embedding, created_time: float) -> bytes:
    """The shared form: MAGIC, a 4-byte header length, a JSON header, then the
    features and any high-resolution maps as float16 .npy arrays one after
    the other; the header carries each array's length and the SHA-256 of them
    all."""
    arrays = []
    for array in (embedding.features, *embedding.high_res_features):
        payload = io.BytesIO()
        np.save(payload, array.astype(np.float16), allow_pickle=False)
        arrays.append(payload.getvalue())
    body = b"".join(arrays)
    header = json.dumps(
        {
            "originalSize": list(embedding.original_size),
            "inputSize": list(embedding.input_size),
            "createdTime": created_time,
            "payloadBytes": len(body),
            "arrayBytes": [len(array) for array in arrays],
            "payloadSha256": hashlib.sha256(body).hexdigest(),
        }
    ).encode()
    return MAGIC + _HEADER_LENGTH.pack(len(header)) + header + body


class CorruptEntry(ValueError):
    """A shared entry that is not whole or not what its header says."""


def decode_entry(data: bytes) -> tuple[Embedding, float]:
    """The embedding (as float32) and when it was made; raises CorruptEntry."""
    start = len(MAGIC) + _HEADER_LENGTH.size
    if len(data) < start or not data.startswith(MAGIC):
        raise CorruptEntry("not an embedding entry")
    (header_length,) = _HEADER_LENGTH.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start : start + header_length])
        body = data[start + header_length :]
        if len(body) != header["payloadBytes"]:
            raise CorruptEntry(
                f"payload of {len(body)} bytes, header says {header['payloadBytes']}"
            )
        if hashlib.sha256(body).hexdigest() != header["payloadSha256"]:
            raise CorruptEntry("payload does not match its checksum")
        # Entries written before SAM 2 hold one array and do not list lengths.
        lengths = [int(n) for n in header.get("arrayBytes", [len(body)])]
        if sum(lengths) != len(body) or not lengths or min(lengths) <= 0:
            raise CorruptEntry(f"array lengths {lengths} do not fill the payload")
        bounds = itertools.pairwise(itertools.accumulate(lengths, initial=0))
        arrays = [_whole_npy(body[a:b]) for a, b in bounds]
        original = tuple(int(v) for v in header["originalSize"])
        input_size = tuple(int(v) for v in header["inputSize"])
        created = float(header["createdTime"])
    except CorruptEntry:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"unreadable entry: {exc}") from exc
    for array in arrays:
        if array.dtype != np.float16 or array.ndim != 4:
            raise CorruptEntry(f"unexpected features {array.dtype} {array.shape}")
    if len(original) != 2 or len(input_size) != 2:
        raise CorruptEntry(f"unexpected sizes {original} {input_size}")
    embedding = Embedding(
        features=arrays[0].astype(np.float32),
        original_size=(original[0], original[1]),
        input_size=(input_size[0], input_size[1]),
        high_res_features=tuple(array.astype(np.float32) for array in arrays[1:]),
    )
    return embedding, created


def _whole_npy(data: bytes) -> npt.NDArray[np.generic]:
    """The one .npy array ``data`` holds; np.load alone would ignore bytes
    after it, and so a length that swallows the next array."""
    buffer = io.BytesIO(data)
    array: npt.NDArray[np.generic] = np.load(buffer, allow_pickle=False)
    if buffer.tell() != len(data):
        raise CorruptEntry(f"{len(data) - buffer.tell()} bytes after an array")
    return array


class EmbeddingCache:
    """Both tiers. ``storage`` None: tier 1 only. Safe to share between
    threads (one lock around tier 1; storage clients are thread-safe)."""

    def __init__(
        self,
        storage: ObjectStorage | None,
        *,
        max_bytes: int,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        self._local: LRUCache[EmbeddingKey, Embedding] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda embedding: embedding.nbytes
        )
        self._lock = threading.Lock()

    @property
    def local_bytes(self) -> int:
        """Bytes tier 1 holds now (never above its bound)."""
        return int(self._local.currsize)

    @property
    def local_max_bytes(self) -> int:
        return int(self._local.maxsize)

    def get_or_compute(
        self, key: EmbeddingKey, compute: Callable[[], Embedding]
    ) -> tuple[Embedding, EmbeddingSource]:
        """The embedding for ``key`` from tier 1, else tier 2, else ``compute``
        (whose result both tiers then keep)."""
        found = self.find(key)
        if found is not None:
            return found
        embedding = compute()
        self.keep(key, embedding)
        return embedding, EmbeddingSource.COMPUTED

    def find(self, key: EmbeddingKey) -> tuple[Embedding, EmbeddingSource] | None:
        """The embedding for ``key`` from tier 1, else tier 2 (then kept in
        tier 1 too), else None."""
        with self._lock:
            found = self._local.get(key)
        if found is not None:
            return found, EmbeddingSource.LOCAL
        shared = self._read_shared(key)
        if shared is not None:
            self._keep_local(key, shared)
            return shared, EmbeddingSource.SHARED
        return None

    def keep(self, key: EmbeddingKey, embedding: Embedding) -> None:
        """Keep a computed embedding in both tiers."""
        self._keep_local(key, embedding)
        self._write_shared(key, embedding)

    def _keep_local(self, key: EmbeddingKey, embedding: Embedding) -> None:
        # One larger than the whole bound is not kept here; tier 2 keeps it.
        with self._lock, contextlib.suppress(ValueError):
            self._local[key] = embedding

    def _read_shared(self, key: EmbeddingKey) -> Embedding | None:
        if self._storage is None:
            return None
        try:
            data = self._storage.get(key.object_key)
        except ObjectNotFound:
            return None
        except StorageError as exc:
            # Storage trouble costs an encode, never the item; one line, as
            # storage down is the breaker's to report (worker/dependency_breaker.py).
            log.warning("could not read embedding %s; computing it: %s", key.object_key, exc)
            return None
        try:
            embedding, created = decode_entry(data)
        except CorruptEntry as exc:
            log.warning("embedding %s is corrupt (%s); computing it again", key.object_key, exc)
            return None
        if self._clock() - created > self._ttl_seconds:
            return None
        return embedding

    def _write_shared(self, key: EmbeddingKey, embedding: Embedding) -> None:
        if self._storage is None:
            return
        try:
            self._storage.put(
                key.object_key,
                encode_entry(embedding, self._clock()),
                "application/vnd.segq.embedding",
            )
        except StorageError as exc:
            log.warning("could not store embedding %s: %s", key.object_key, exc)


def expired_embeddings(
    storage: ObjectStorage, ttl_seconds: int, now: float | None = None
) -> Iterator[str]:
    """Keys of shared embeddings written more than ``ttl_seconds`` ago."""
    cutoff = (time.time() if now is None else now) - ttl_seconds
    for stored in storage.list_objects(EMBEDDINGS_PREFIX):
        if stored.modified_time < cutoff:
            yield stored.key


def sweep_expired_embeddings(storage: ObjectStorage, ttl_seconds: int) -> int:
    """Delete the expired shared embeddings; returns how many. Readers treat
    an expired entry as missing whether or not a sweep has run yet."""
    deleted = 0
    for key in list(expired_embeddings(storage, ttl_seconds)):
        storage.delete(key)
        deleted += 1
    if deleted:
        log.info("embedding sweep: deleted %d expired embeddings", deleted)
    return deleted
