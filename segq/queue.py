"""The queue contract between API and worker: task names and how to publish.

The broker only carries item ids; Postgres holds the truth. Both processes
build their Celery app here so they agree on every setting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

from celery import Celery

SEGMENT_ITEM_TASK = "segq.segment_item"
SEGMENT_QUEUE = "segq.segment"
DELIVER_WEBHOOK_TASK = "segq.deliver_webhook"
#: Its own queue, so deliveries can be served by workers that load no model
#: and a slow receiver never holds a GPU worker.
WEBHOOK_QUEUE = "segq.webhooks"
QUEUES = {"segment": SEGMENT_QUEUE, "webhooks": WEBHOOK_QUEUE}

log = logging.getLogger(__name__)


def make_celery(broker_url: str, *, broker_folder: Path, time_limit_seconds: int) -> Celery:
    app = Celery("segq", broker=broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    if broker_url.startswith("filesystem://"):
        # The embedded broker: messages are files in one folder that API and
        # worker share, so no broker server is needed.
        for folder in ("in", "processed", "control"):
            (broker_folder / folder).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(broker_folder / "in"),
            "data_folder_out": str(broker_folder / "in"),
            "processed_folder": str(broker_folder / "processed"),
            "store_processed": False,
            # Exchange bindings; kombu's default is ./control in the working directory.
            "control_folder": str(broker_folder / "control"),
        }
    else:
        # Redis redelivers a message that is not acknowledged within this
        # time. Messages are acknowledged only after the item is done (acks
        # late), so it must outlast the longest item, which the time limit
        # bounds; otherwise a slow item would be delivered twice.
        transport_options = {"visibility_timeout": time_limit_seconds * 2}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Publishing happens inside an API request: give up quickly and let
        # the reconciler send the message later, rather than hold the client.
        broker_connection_timeout=3,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        task_default_queue=SEGMENT_QUEUE,
        task_routes={DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledge after the work, not before: a worker that dies mid-item
        # leaves the message to be delivered again.
        task_acks_late=True,
        # When a pool process is killed, put its message back rather than
        # acknowledge it. The redelivery finds the item still leased and
        # wakes a worker for another item, so a poison image cannot
        # crash-loop workers through the broker; the item runs again only
        # once the lease has run out and the reconciler (worker/reconciler.py)
        # re-queues it, which counts the attempt. The message is a wake-up
        # call (any message claims the item queued first); the lease is the
        # truth.
        task_reject_on_worker_lost=True,
        # One message at a time per process: a GPU worker should not hoard
        # items that an idle worker could take.
        worker_prefetch_multiplier=1,
        # A hung item is killed (and its lease, no longer renewed, runs out)
        # long before Redis would make its message visible again.
        task_time_limit=time_limit_seconds,
        task_soft_time_limit=max(time_limit_seconds - 30, time_limit_seconds // 2),
        worker_hijack_root_logger=False,
    )
    return app


def enqueue_items(app: Celery, item_ids: Iterable[int]) -> None:
    """Publish one wake-up message per item, over one connection. Call only
    after the rows are committed: a worker may run before this returns.

    On Redis the messages go in pipelined batches (kombu's producer batch):
    one round trip per thousand messages instead of one per message. A batch
    that fails raises, and some of its messages may have been delivered:
    callers then leave the items to the reconciler, and an extra wake-up
    call is harmless. Brokers without batches publish one at a time."""
    ids = list(item_ids)
    with app.producer_or_acquire() as producer:
        # A batch builds a Redis pipeline, which costs more than the one
        # round trip it saves when there is a single message.
        batch = producer.batch() if len(ids) > 1 else nullcontext()
        with batch:
            for item_id in ids:
                app.send_task(SEGMENT_ITEM_TASK, args=[item_id], producer=producer)


def messages_waiting(app: Celery, queue: str = SEGMENT_QUEUE) -> int:
    """Messages in ``queue`` that no worker has taken yet; one broker round
    trip (kombu counts them on Redis, all priorities, and on the filesystem
    broker alike)."""
    with app.connection_or_acquire() as connection:
        declared = connection.default_channel.queue_declare(queue=queue, passive=False)
        return int(declared.message_count)


def enqueue_deliveries(app: Celery, delivery_ids: Iterable[int]) -> None:
    """Publish one wake-up message per webhook delivery, after commit."""
    with app.producer_or_acquire() as producer:
        for delivery_id in delivery_ids:
            app.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id], producer=producer)
