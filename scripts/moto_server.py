"""Runs moto's server (the SQS and SNS the tests use) with ReceiveMessage made atomic per queue.

moto serves each request on its own thread, and its ReceiveMessage checks that a message is
visible and then marks it received without a lock in between. Two receives on one queue at
the same moment (two pollers of one subscription, or two consumers of one queue) can both take
the same message: it arrives twice within its visibility timeout, the second time with
ApproximateReceiveCount 2. SQS itself hands a message to one receive at a time. With moto
5.2.1 to 5.2.5 and eight threads long-polling one queue, 2 of 3,000 messages arrived twice;
in the test suite it showed as a rare second delivery at attempt 2.

Here each receive takes its queue's lock while it looks for and marks messages (moto's own
receive with no wait) and waits for new messages outside it, so long polls on one queue still
wait side by side. Everything else is moto's server as `moto_server` runs it, with the same
arguments.

`moto_server.py --check` proves the patch in-process, without a server: it widens the gap
between moto's visibility check and its mark to 50 ms and has two receives take one message
at once, with moto's receive and with this one; then has a 2 s long poll wait for a message
sent 0.2 s into it. It exits non-zero unless this receive hands the message out once and the
long poll returns the late message at once (scripts/test.sh runs it through
`scripts/brokers.sh check`, which also checks that the server on 4566 runs this file).
"""

import sys
import threading
import time
import uuid

from moto.server import main
from moto.sqs.models import Message, SQSBackend, sqs_backends

_receive = SQSBackend.receive_message
_locks: dict[tuple[int, str], threading.Lock] = {}
_locks_lock = threading.Lock()

# How long a receive pauses when visible messages are there but none can be taken (their FIFO
# group is in flight): waiting for messages returns at once while they are visible, and moto's
# own loop spins on them.
_BLOCKED_PAUSE = 0.02


def _lock_for(backend: SQSBackend, queue_name: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault((id(backend), queue_name), threading.Lock())


def receive_message(
    self: SQSBackend,
    queue_name: str,
    count: int,
    wait_seconds_timeout: int,
    visibility_timeout: int,
    message_attribute_names: list[str] | None = None,
):
    queue = self.get_queue(queue_name)
    lock = _lock_for(self, queue_name)
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        with lock:
            taken = _receive(
                self, queue_name, count, 0, visibility_timeout, message_attribute_names
            )
            blocked = not taken and bool(queue.messages)
        left = deadline - time.monotonic()
        if taken or left <= 0:
            return taken
        if blocked:
            time.sleep(min(left, _BLOCKED_PAUSE))
        else:
            queue.wait_for_messages(min(left, 1.0))


def _taken_by_two_at_once(backend: SQSBackend, receive) -> int:
    """How many of two receives started together take the one message of a new queue."""
    name = f"moto-check-{uuid.uuid4().hex}"
    backend.create_queue(name)
    backend.send_message(name, "check")
    counts: list[int] = []

    def one() -> None:
        counts.append(len(receive(backend, name, 10, 0, 30)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.delete_queue(name)
    return sum(counts)


def _long_poll_gets_a_late_message(backend: SQSBackend) -> float | None:
    """Seconds a 2 s long poll took to return a message sent 0.2 s into it (None: it did not)."""
    name = f"moto-check-{uuid.uuid4().hex}"
    backend.create_queue(name)
    late = threading.Timer(0.2, lambda: backend.send_message(name, "late"))
    started = time.monotonic()
    late.start()
    taken = receive_message(backend, name, 10, 2, 30)
    took = time.monotonic() - started
    late.join()
    backend.delete_queue(name)
    return took if len(taken) == 1 else None


def check() -> int:
    """See the module docs: 0 when the patched receive takes the message once."""
    backend = sqs_backends["123456789012"]["us-east-1"]
    mark = Message.mark_received

    def slow_mark(self, *args, **kwargs):
        time.sleep(0.05)
        return mark(self, *args, **kwargs)

    Message.mark_received = slow_mark
    try:
        theirs = _taken_by_two_at_once(backend, _receive)
        ours = _taken_by_two_at_once(backend, receive_message)
    finally:
        Message.mark_received = mark
    print(
        "moto ReceiveMessage, two at once on one message: "
        f"moto's own took it {theirs} times, scripts/moto_server.py's {ours}"
    )
    if theirs == 1:
        print("moto's own receive no longer races here: this patch may be dropped")
    took = _long_poll_gets_a_late_message(backend)
    print(
        "a 2 s long poll, a message sent 0.2 s into it: "
        + ("not returned" if took is None else f"returned after {took:.2f} s")
    )
    return 0 if ours == 1 and took is not None and took < 1.5 else 1


SQSBackend.receive_message = receive_message

if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    sys.exit(main(sys.argv[1:]))
