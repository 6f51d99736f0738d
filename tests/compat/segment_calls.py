"""The Segment calls both Python compatibility scripts make: every call type,
with explicit message ids, fields the Rust tests check afterwards."""
from datetime import datetime, timezone

import segment.analytics as analytics

TIMESTAMP = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def make_client(host, write_key, errors, gzip=False):
    """An unmodified SDK client; its errors are appended to `errors`."""
    return analytics.Client(
        write_key=write_key,
        host=host,
        gzip=gzip,
        on_error=lambda e, batch: errors.append(repr(e)),
        upload_size=37,  # several batches per run
        max_retries=3,
    )


def send_all(client, prefix, count):
    """Make `count` rounds of the six calls; return what was sent."""
    sent = []
    for i in range(count):
        calls = [
            ("identify", lambda m: client.identify(f"user-{i}", {"email": f"u{i}@example.com", "plan": "pro"}, message_id=m, timestamp=TIMESTAMP)),
            ("track", lambda m: client.track(f"user-{i}", "Order Completed", {"total": i + 0.5, "items": [1, 2]}, message_id=m, context={"ip": "10.0.0.1"})),
            ("page", lambda m: client.page(f"user-{i}", "Docs", "Install", {"path": "/install"}, message_id=m)),
            ("screen", lambda m: client.screen(f"user-{i}", "App", "Home", {"tab": 3}, message_id=m)),
            ("group", lambda m: client.group(f"user-{i}", f"group-{i}", {"seats": 10}, message_id=m)),
            ("alias", lambda m: client.alias(f"anon-{i}", f"user-{i}", message_id=m)),
        ]
        for kind, call in calls:
            mid = f"{prefix}-{i}-{kind}"
            call(mid)
            sent.append({"messageId": mid, "type": kind, "userId": f"user-{i}", "i": i})
    return sent
