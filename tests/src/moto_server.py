# Starts moto's server with a faster clock. moto (5.x) asks `unix_time()` for the current time
# twice per queued message on every SQS request, and that function builds datetime objects each
# time (~10 us): a receive on a queue holding 1,000 messages took 1.1 s, 5,000 messages made the
# conformance scenarios time out. For "now" this returns the same value from time.time(); every
# other call (with a datetime) is moto's own. SQS semantics are untouched.
import sys
import time

import moto.core.utils as utils

_unix_time, _unix_time_millis = utils.unix_time, utils.unix_time_millis


def unix_time(dt=None):
    return time.time() if dt is None else _unix_time(dt)


def unix_time_millis(dt=None):
    return time.time() * 1000.0 if dt is None else _unix_time_millis(dt)


utils.unix_time, utils.unix_time_millis = unix_time, unix_time_millis
import moto.sqs.models as sqs_models  # noqa: E402

for name, f in (("unix_time", unix_time), ("unix_time_millis", unix_time_millis)):
    if hasattr(sqs_models, name):
        setattr(sqs_models, name, f)

# Per-request cost that grows with the queue's depth, cut without changing what SQS does:
# - `Queue.messages` (the visible, undelayed ones) asked the clock twice per message: once now.
# - `Queue.delete_message` scanned every message's receipt handles twice per handle (a batch of
#   10 deletes on a 5,000-message queue: 100,000 scans): an index from receipt handle to message
#   finds it at once. A handle that never named a message of this queue is still invalid, a
#   deleted one still deletes nothing, as in moto.
import weakref  # noqa: E402

_by_handle = weakref.WeakValueDictionary()
_mark_received = sqs_models.Message.mark_received


def mark_received(self, visibility_timeout=None):
    _mark_received(self, visibility_timeout)
    _by_handle[self.receipt_handle] = self


def messages(self):
    now = time.time() * 1000.0
    return [m for m in self._messages if now >= m.visible_at and not now < m.delayed_until]


def delete_message(self, receipt_handle):
    if receipt_handle in self.deleted_messages:
        return
    message = _by_handle.get(receipt_handle)
    if message is None:
        raise sqs_models.ReceiptHandleIsInvalid()
    try:
        self._messages.remove(message)
    except ValueError:
        raise sqs_models.ReceiptHandleIsInvalid()
    self.pending_messages.discard(message)
    self.deleted_messages.update(message.all_receipt_handles)
    for h in message.all_receipt_handles:
        _by_handle.pop(h, None)


# - Every send and every received message asked for the queue's attributes (for its
#   deduplication setting and retention period) up to four times, and each time moto counted
#   the visible, delayed and in-flight messages in three passes over the queue: publishing and
#   receiving were quadratic in the depth. The three counts are now taken in one pass, once per
#   SQS request (no request reads them after changing the queue within itself, and
#   GetQueueAttributes counts afresh on each call).
def _counts(self):
    cache = getattr(_held, "counts", None)
    got = cache.get(id(self)) if cache is not None else None
    if got is None:
        now = time.time() * 1000.0
        ready = delayed = hidden = 0
        for m in self._messages:
            d = now < m.delayed_until
            v = now >= m.visible_at
            delayed += d
            hidden += not v
            ready += v and not d
        got = (ready, delayed, hidden)
        if cache is not None:
            cache[id(self)] = got
    return got


sqs_models.Queue.approximate_number_of_messages = property(lambda q: _counts(q)[0])
sqs_models.Queue.approximate_number_of_messages_delayed = property(lambda q: _counts(q)[1])
sqs_models.Queue.approximate_number_of_messages_not_visible = property(lambda q: _counts(q)[2])
sqs_models.Message.mark_received = mark_received


# A message is visible once its visibility time has come (moto: only strictly after it). moto's
# ChangeMessageVisibility to 0 sets the time to now and asks at once whether the message is
# visible, to take it off the in-flight set; the clock reads the same value about half the time
# (time.time() is coarser than two calls), so the released message stayed "in flight" and held
# its FIFO group shut: the next receive skipped it and handed out a later message of the group
# (seen in CI: b2 came back before the released b0). SQS makes such a message visible at once.
def visible(self):
    return time.time() * 1000.0 >= self.visible_at


sqs_models.Message.visible = property(visible)
sqs_models.Queue.messages = property(messages)
sqs_models.Queue.delete_message = delete_message

# moto's server runs each request in a thread, and its SQS backend keeps no lock: two receives at
# once can hand out one message with two receipt handles, and two deletes at once rebuild the
# queue's message list from the same snapshot, so a deleted message comes back (seen with 20
# concurrent consumers: acked messages delivered again 30 s later). SQS itself is atomic here.
# One lock around every SQS backend call makes moto's requests atomic too (moto is bound by
# Python's GIL anyway); a long poll gives the lock up while it waits, so it never holds up other
# requests.
import functools  # noqa: E402
import threading  # noqa: E402

_lock = threading.Lock()
_held = threading.local()


def _locked(f):
    @functools.wraps(f)
    def call(*args, **kwargs):
        if getattr(_held, "yes", False):
            return f(*args, **kwargs)
        with _lock:
            _held.yes = True
            _held.counts = {}
            try:
                return f(*args, **kwargs)
            finally:
                _held.yes = False
                _held.counts = None

    return call


for _name, _f in list(vars(sqs_models.SQSBackend).items()):
    if callable(_f) and not _name.startswith("_"):
        setattr(sqs_models.SQSBackend, _name, _locked(_f))

_wait = sqs_models.Queue.wait_for_messages


# moto's long poll waits until the queue has *visible* messages, so on a FIFO queue whose
# visible messages all belong to groups with a message in flight it returns at once and the
# receive loop spins (rescanning and deep-copying the queue, holding Python's GIL): three idle
# consumers of a busy FIFO queue made every other request crawl. Then this waits 5 ms (or until
# a message is added) before moto looks again, as SQS's long poll would simply wait.
def _wait_blocked(self, timeout):
    with self._messages_lock:
        if self.messages:
            self._messages_lock.wait(timeout=min(timeout, 0.005))
            return
    _wait(self, timeout)


def wait_for_messages(self, timeout):
    _held.yes = False
    _lock.release()
    try:
        return _wait_blocked(self, timeout)
    finally:
        _lock.acquire()
        _held.yes = True
        _held.counts = {}


sqs_models.Queue.wait_for_messages = wait_for_messages

# Per-request work of moto's HTTP front that does not depend on the request: finding the backend
# for the Host header listed moto's package directory (a stat per service, ~200) on every request,
# and werkzeug logged every request line (to a stderr nobody reads). Together ~20% of moto's CPU in
# the FIFO ordering scenario, where moto's one core is the bottleneck.
import logging  # noqa: E402

import moto.backends as moto_backends  # noqa: E402

_modules = list(moto_backends.list_of_moto_modules())
moto_backends.list_of_moto_modules = lambda: _modules
logging.getLogger("werkzeug").setLevel(logging.WARNING)

# The test process holds our stdin open; when it exits (a static suite is never dropped, a test
# may be killed), stdin reaches end of file and the server goes with it: no orphaned servers.
import os  # noqa: E402


def _exit_with_parent():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)


threading.Thread(target=_exit_with_parent, daemon=True).start()

from moto.server import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
