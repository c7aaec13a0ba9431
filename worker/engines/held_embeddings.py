"""Which image embedding a SAM-family engine holds, and where each comes
from: kept from the last image, readied ahead by a batch, found in the
embedding cache, or encoded (and then cached). SAM and SAM 2 differ only
in what an encoded image is and how their predictor takes one: those are
the ``EncodedImages`` an engine gives; the bookkeeping is here, once.

The engine holds its own lock around every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from segq.worker.engines.embedding_cache import (
    Embedding,
    EmbeddingCache,
    EmbeddingKey,
    EmbeddingSource,
    image_digest,
)
from segq.worker.engines.item_metrics import record_embedding

#: One encoded image, as the engine keeps it (on its device).
E = TypeVar("E")


@dataclass(frozen=True)
class EncodedImages(Generic[E]):
    """What an engine does with its encoded images."""

    #: (H, W) of an image as the encoder takes it (part of its digest).
    input_size: Callable[[npt.NDArray[np.uint8]], tuple[int, int]]
    #: Encode images (in batches as the engine's batch size allows).
    encode: Callable[[Sequence[npt.NDArray[np.uint8]]], list[E]]
    #: Make the predictor hold one, without running the encoder.
    hold: Callable[[E], None]
    #: The cache's form (host memory) and back.
    to_embedding: Callable[[E], Embedding]
    from_embedding: Callable[[Embedding], E]


class HeldEmbeddings(Generic[E]):
    """With ``embeddings`` (and ``model_id``, naming the model and its
    checkpoint there), an image another item or worker encoded is restored
    from that cache instead of encoded again."""

    def __init__(
        self,
        images: EncodedImages[E],
        embeddings: EmbeddingCache | None,
        model_id: str | None,
    ) -> None:
        if (embeddings is None) != (model_id is None):
            raise ValueError("an embedding cache needs the model's id, and only it")
        self._images = images
        self._embeddings = embeddings
        #: The cache's name for the model and its checkpoint.
        self.model_id = model_id
        self._held: str | None = None
        #: Made or found by ready_batch, by image digest, each with where it
        #: came from and its share of the batch's time (ms), until the next batch.
        self._ready: dict[str, tuple[E, EmbeddingSource, float]] = {}

    def ready_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> None:
        """Get ``images`` ready for the ``hold_for`` calls that follow:
        found in the cache, or encoded together. What an earlier batch
        readied and no call took is dropped."""
        self._ready = {}
        missing: dict[str, npt.NDArray[np.uint8]] = {}
        for image in images:
            started = time.perf_counter()
            digest = self._digest(image)
            if digest == self._held or digest in self._ready or digest in missing:
                continue
            found = self._cached(digest)
            if found is None:
                missing[digest] = image
            else:
                embedding, source = found
                elapsed_ms = (time.perf_counter() - started) * 1000
                self._ready[digest] = (self._images.from_embedding(embedding), source, elapsed_ms)
        if not missing:
            return
        started = time.perf_counter()
        encoded = self._images.encode(list(missing.values()))
        share_ms = (time.perf_counter() - started) * 1000 / len(missing)
        for digest, image_encoded in zip(missing, encoded, strict=True):
            if self._embeddings is not None and self.model_id is not None:
                self._embeddings.keep(
                    EmbeddingKey(self.model_id, digest), self._images.to_embedding(image_encoded)
                )
            self._ready[digest] = (image_encoded, EmbeddingSource.COMPUTED, share_ms)

    def hold_for(self, image: npt.NDArray[np.uint8]) -> None:
        """Make the predictor hold ``image``'s embedding, and record where
        it came from and what it cost in the item's metrics."""
        started = time.perf_counter()
        digest = self._digest(image)
        earlier_ms = 0.0
        if digest == self._held:
            source = EmbeddingSource.LOCAL
        else:
            self._held = None  # stays None if encoding fails halfway
            ready = self._ready.get(digest)
            if ready is None:
                source = self._hold_found_or_encoded(image, digest)
            else:
                encoded, source, earlier_ms = ready
                self._images.hold(encoded)
                # Kept (bounded by the batch) for another item of the same image.
                self._ready[digest] = (encoded, EmbeddingSource.LOCAL, 0.0)
            self._held = digest
        record_embedding(source, (time.perf_counter() - started) * 1000 + earlier_ms)

    def _hold_found_or_encoded(self, image: npt.NDArray[np.uint8], digest: str) -> EmbeddingSource:
        if self._embeddings is None or self.model_id is None:
            [encoded] = self._images.encode([image])
            self._images.hold(encoded)
            return EmbeddingSource.COMPUTED
        computed: list[E] = []

        def encode() -> Embedding:
            computed.extend(self._images.encode([image]))
            return self._images.to_embedding(computed[0])

        embedding, source = self._embeddings.get_or_compute(
            EmbeddingKey(self.model_id, digest), encode
        )
        # A computed one is still on the device: no copy back from the host.
        self._images.hold(computed[0] if computed else self._images.from_embedding(embedding))
        return source

    def _cached(self, digest: str) -> tuple[Embedding, EmbeddingSource] | None:
        if self._embeddings is None or self.model_id is None:
            return None
        return self._embeddings.find(EmbeddingKey(self.model_id, digest))

    def _digest(self, image: npt.NDArray[np.uint8]) -> str:
        return image_digest(image, self._images.input_size(image))
