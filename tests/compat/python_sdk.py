"""Send every Segment call type through the official Python SDK
(`segment-analytics-python`, unchanged) to a Sluice server.

Usage: python_sdk.py HOST WRITE_KEY RUN_ID COUNT [--gzip]
Prints one JSON object per line for each event it sent, describing what the
log must hold; exits non-zero if the SDK reported any error.
"""
import json
import sys

from segment_calls import make_client, send_all

host, write_key, run_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
gzip = "--gzip" in sys.argv[5:]
errors = []

client = make_client(host, write_key, errors, gzip=gzip)

sent = send_all(client, f"py-{run_id}", count)

client.flush()
client.join()
for s in sent:
    print(json.dumps(s))
if errors:
    print("SDK errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
