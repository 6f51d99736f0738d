"""Send track events through the official Python SDK
(`segment-analytics-python`, unchanged), one client per write key, to a
cell router: the cells topology test's Python workspaces.

Usage: python_cells.py HOST COUNT KEY=PREFIX [KEY=PREFIX ...]
Each client sends COUNT track events with messageIds PREFIX-0 ... and prints
one JSON object per event ({"messageId", "key"}); exits non-zero if any
client reported an error. SLUICE_SDK_PACE_MS (default 0) spaces the events
out, so a run can span a migration's cutover.
"""
import json
import os
import sys
import time

import segment.analytics as analytics

host, count = sys.argv[1], int(sys.argv[2])
pace = int(os.environ.get("SLUICE_SDK_PACE_MS", "0")) / 1000
errors = []
clients = []
sent = []
for pair in sys.argv[3:]:
    key, prefix = pair.split("=", 1)
    client = analytics.Client(
        write_key=key,
        host=host,
        on_error=lambda e, batch, key=key: errors.append(f"{key}: {e!r}"),
        upload_size=25,
        max_retries=5,
    )
    clients.append(client)
    for i in range(count):
        mid = f"{prefix}-{i}"
        client.track(f"user-{i}", "Cell Test", {"i": i}, message_id=mid)
        sent.append({"messageId": mid, "key": key})
        if pace:
            time.sleep(pace)
for client in clients:
    client.flush()
    client.join()
for s in sent:
    print(json.dumps(s))
if errors:
    print("SDK errors: " + "; ".join(errors[:20]), file=sys.stderr)
    sys.exit(1)
