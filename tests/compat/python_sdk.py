"""Send every Segment call type through the official Python SDK
(`segment-analytics-python`, unchanged) to a Sluice server.

Usage: python_sdk.py HOST WRITE_KEY RUN_ID COUNT [--gzip]
Prints one JSON object per line for each event it sent, describing what the
log must hold; exits non-zero if the SDK reported any error.
"""
import json
import sys
from datetime import datetime, timezone

import segment.analytics as analytics

host, write_key, run_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
gzip = "--gzip" in sys.argv[5:]
errors = []

client = analytics.Client(
    write_key=write_key,
    host=host,
    gzip=gzip,
    on_error=lambda e, batch: errors.append(repr(e)),
    upload_size=37,  # several batches per run
    max_retries=3,
)

sent = []
ts = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
for i in range(count):
    base = f"py-{run_id}-{i}"
    calls = [
        ("identify", lambda m: client.identify(f"user-{i}", {"email": f"u{i}@example.com", "plan": "pro"}, message_id=m, timestamp=ts)),
        ("track", lambda m: client.track(f"user-{i}", "Order Completed", {"total": i + 0.5, "items": [1, 2]}, message_id=m, context={"ip": "10.0.0.1"})),
        ("page", lambda m: client.page(f"user-{i}", "Docs", "Install", {"path": "/install"}, message_id=m)),
        ("screen", lambda m: client.screen(f"user-{i}", "App", "Home", {"tab": 3}, message_id=m)),
        ("group", lambda m: client.group(f"user-{i}", f"group-{i}", {"seats": 10}, message_id=m)),
        ("alias", lambda m: client.alias(f"anon-{i}", f"user-{i}", message_id=m)),
    ]
    for kind, call in calls:
        mid = f"{base}-{kind}"
        call(mid)
        sent.append({"messageId": mid, "type": kind, "userId": f"user-{i}", "i": i})

client.flush()
client.join()
for s in sent:
    print(json.dumps(s))
if errors:
    print("SDK errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
