"""What one API process remembers between requests to spare the database a
query on every request, each for about a second (job answers: for as long
as their ETag holds). Per process, so API processes do not share them; per
app, so tests never see another's."""

from __future__ import annotations

import threading
import time

from cachetools import LRUCache
from sqlalchemy.orm import Session

from segq.models import Project
from segq.projects import hash_api_key, project_for_key

#: How long a key's project is remembered. A revoked key keeps working for
#: at most this long on an API process that saw it just before.
KEY_MEMORY_SECONDS = 1.0
#: How long a count of a project's unfinished jobs stands in for a new one.
UNFINISHED_COUNT_MAX_AGE_SECONDS = 1.0


class ProjectsByKey:
    """The project of each live API key seen lately, by the key's hash.
    Unknown and revoked keys are never remembered: each is looked up again."""

    def __init__(self, memory_seconds: float = KEY_MEMORY_SECONDS) -> None:
        self._memory_seconds = memory_seconds
        # key hash -> (forget at, project id, name, created time)
        self._found: dict[str, tuple[float, int, str, int]] = {}

    def project(self, session: Session, key: str) -> Project | None:
        key_hash = hash_api_key(key)
        now = time.monotonic()
        found = self._found.get(key_hash)
        if found is not None and now < found[0]:
            # A fresh, detached copy per request: handlers only read it.
            return Project(id=found[1], name=found[2], created_time=found[3])
        project = project_for_key(session, key)
        if project is None:
            self._found.pop(key_hash, None)
            return None
        self._found[key_hash] = (
            now + self._memory_seconds,
            project.id,
            project.name,
            project.created_time,
        )
        return project


class UnfinishedJobCounts:
    """Each project's unfinished jobs as this process last counted them, plus
    the jobs it was asked to create since; a count older than ``max_age``
    seconds is not used."""

    def __init__(self, max_age: float = UNFINISHED_COUNT_MAX_AGE_SECONDS) -> None:
        self._max_age = max_age
        self._lock = threading.Lock()
        # project id -> (counted at, count)
        self._counts: dict[int, tuple[float, int]] = {}

    def recent(self, project_id: int) -> int | None:
        with self._lock:
            entry = self._counts.get(project_id)
        if entry is None or time.monotonic() - entry[0] > self._max_age:
            return None
        return entry[1]

    def counted(self, project_id: int, count: int) -> None:
        with self._lock:
            self._counts[project_id] = (time.monotonic(), count)

    def add_one(self, project_id: int) -> None:
        with self._lock:
            entry = self._counts.get(project_id)
            if entry is not None:
                self._counts[project_id] = (entry[0], entry[1] + 1)


#: The bytes of job answers an API process keeps: about five answers of a
#: finished 1,000-item job with polygons.
MAX_KEPT_ANSWER_BYTES = 32 * 1024 * 1024


class KeptJobAnswers:
    """The latest bodies of job GETs, by job and ETag. The tag is computed
    from everything the body shows (api/job_answers.py), so a body kept
    under it is the body that GET would render: an unchanged job is
    rendered once per signing window, not once per poll."""

    def __init__(self, max_bytes: int = MAX_KEPT_ANSWER_BYTES) -> None:
        self._lock = threading.Lock()
        self._kept: LRUCache[tuple[int, str], bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)

    def get(self, job_id: int, tag: str) -> bytes | None:
        with self._lock:
            return self._kept.get((job_id, tag))

    def keep(self, job_id: int, tag: str, body: bytes) -> None:
        if len(body) > self._kept.maxsize // 4:
            return  # one answer must not push every other out
        with self._lock:
            self._kept[(job_id, tag)] = body


#: How many characters of finished items' texts a process keeps.
MAX_KEPT_ITEM_CHARS = 64 * 1024 * 1024


class KeptItemTexts:
    """Finished items' texts as a job's answer shows them, links filled in,
    by (job, its creation, position) and signing window: an item finishes
    once and its text never changes after, nor its links within a window.
    So a GET after a change renders only the items that finished since:
    the others are neither read from the database again nor re-filled."""

    def __init__(self, max_chars: int = MAX_KEPT_ITEM_CHARS) -> None:
        self._lock = threading.Lock()
        self._kept: LRUCache[tuple[object, ...], str] = LRUCache(maxsize=max_chars, getsizeof=len)

    def get(self, key: tuple[object, ...]) -> str | None:
        with self._lock:
            return self._kept.get(key)

    def keep(self, key: tuple[object, ...], text: str) -> None:
        if len(text) > self._kept.maxsize // 16:
            return
        with self._lock:
            self._kept[key] = text
