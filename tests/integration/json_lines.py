"""The trainer scripts' side of harness.TrainerProcess: one JSON command per line on stdin, one JSON reply per line
on `out` ({"exception": "..."} when the command raised), until {"op": "quit"}."""
import json
import sys


def serve(handle, out=None):
    out = out or sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            reply = handle(cmd)
        except Exception as e:
            reply = {"exception": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
