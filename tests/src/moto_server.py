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
            try:
                return f(*args, **kwargs)
            finally:
                _held.yes = False

    return call


for _name, _f in list(vars(sqs_models.SQSBackend).items()):
    if callable(_f) and not _name.startswith("_"):
        setattr(sqs_models.SQSBackend, _name, _locked(_f))

_wait = sqs_models.Queue.wait_for_messages


def wait_for_messages(self, timeout):
    _held.yes = False
    _lock.release()
    try:
        return _wait(self, timeout)
    finally:
        _lock.acquire()
        _held.yes = True


sqs_models.Queue.wait_for_messages = wait_for_messages

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
