"""How a route waits for its job: parked by the server where it can be
(api/parking.py), holding no thread and no database connection, else in its
thread. Native ``Prefer: wait``, the peers' synchronous routes and
Replicate's ``Prefer: wait`` all wait here; the machinery that says when a job
may have changed is api/job_waiting.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segq.api.context import close_db, db, services
from segq.api.job_waiting import Wait, WaitingPlace, progress_of, wait_in_thread_until_finished
from segq.api.parking import Parking, park, server_draining


def wait_for_job(
    job_id: int, wait: Wait, resume_environ: Mapping[str, Any], place: WaitingPlace
) -> bool:
    """Wait for ``job_id`` to finish, at most until ``wait``'s deadline, the
    one way every route waits for a job (native ``Prefer: wait``, the
    peers' synchronous routes and Replicate's ``Prefer: wait``).

    True: the request is parked (api/parking.py), holding no thread and no
    database connection; the view returns any response (it is dropped),
    and the server runs the request again, its environ changed by
    ``resume_environ``, when the job may have changed or the deadline
    comes; ``place`` is let go of when the request is done with. False:
    answer now (``place`` is let go of): the job is finished or gone, the
    wait is over, the process is draining, or (where the server cannot
    park) this thread waited."""
    parked = False
    try:
        parked = _parked_or_waited(job_id, wait, resume_environ, place)
    finally:
        if not parked:
            place.release()
    return parked


def _parked_or_waited(
    job_id: int, wait: Wait, resume_environ: Mapping[str, Any], place: WaitingPlace
) -> bool:
    progress = progress_of(db(), [job_id]).get(job_id)
    if progress is None or progress.finished or wait.remaining <= 0 or server_draining():
        return False
    # The request's session goes back to the pool for the whole wait.
    close_db()
    feed = services().job_changes
    parking = Parking(
        watch=lambda parked: feed.watch(job_id, progress, parked.wake),
        deadline=wait.deadline,
        environ=resume_environ,
        stream=False,
        release=place.release,
    )
    if park(parking):
        return True
    wait_in_thread_until_finished(feed, services().sessions, job_id, wait.remaining)
    return False
