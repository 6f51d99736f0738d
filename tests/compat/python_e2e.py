"""Send COUNT events through the official Python SDK
(`segment-analytics-python`, unchanged) to a Sluice server, for the delivery
end-to-end test: track, identify, page and screen calls with explicit
messageIds, and every RESEND_EVERY-th event sent a second time at the end
with the same messageId and the same fields (a client retry).

Usage: python_e2e.py HOST WRITE_KEY RUN_ID COUNT RESEND_EVERY
Prints one JSON object per line for each unique event it sent: messageId,
type, userId, the fields the webhook must receive (event, properties or
traits) and `resent` (sent twice). Exits non-zero if the SDK reported any error.
"""
import json
import sys
from datetime import datetime, timezone

import segment.analytics as analytics

host, write_key, run_id = sys.argv[1], sys.argv[2], sys.argv[3]
count, resend_every = int(sys.argv[4]), int(sys.argv[5])
errors = []
TIMESTAMP = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)

client = analytics.Client(
    write_key=write_key,
    host=host,
    on_error=lambda e, batch: errors.append(repr(e)),
    upload_size=50,
    max_retries=3,
)


def call(s):
    """Make the SDK call `s` describes."""
    m, user = s["messageId"], s["userId"]
    kind = s["type"]
    if kind == "track":
        client.track(user, s["event"], s["properties"], message_id=m, timestamp=TIMESTAMP)
    elif kind == "identify":
        client.identify(user, s["traits"], message_id=m, timestamp=TIMESTAMP)
    elif kind == "page":
        client.page(user, None, "Install", s["properties"], message_id=m, timestamp=TIMESTAMP)
    elif kind == "screen":
        client.screen(user, None, "Home", s["properties"], message_id=m, timestamp=TIMESTAMP)
    else:
        raise ValueError(kind)


sent = []
for i in range(count):
    kind = ["track", "identify", "page", "screen"][i % 4]
    s = {"messageId": f"py-e2e-{run_id}-{i}", "type": kind, "userId": f"py-user-{i}", "i": i,
         "resent": i % resend_every == 0}
    if kind == "track":
        s["event"] = "Order Completed"
        s["properties"] = {"total": i + 0.5, "items": [1, 2, {"sku": f"sku-{i}"}], "note": "h\u00e9llo \u2603", "paid": True}
    elif kind == "identify":
        s["traits"] = {"email": f"u{i}@example.com", "plan": "pro", "seats": i}
    elif kind == "page":
        s["properties"] = {"path": f"/install/{i}", "referrer": None}
    else:
        s["properties"] = {"tab": i % 7, "flags": {"dark": False}}
    call(s)
    sent.append(s)

# The client retries: the same calls again, same messageIds, in later batches.
resent = [s for s in sent if s["resent"]]
for s in resent:
    call(s)

client.flush()
client.join()
for s in sent:
    print(json.dumps(s))
print(f"{len(sent)} events, {len(resent)} sent twice", file=sys.stderr)
if errors:
    print("SDK errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
