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

from moto.server import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
