"""Report training progress to the Watt agent that runs this worker.

The agent sets WATT_PROGRESS_SOCKET for every shard; each report is one JSON object in one Unix
datagram. Sending never blocks training: when the agent is away, a report is simply dropped.
The three lines that matter are in `report`; copy them into any training script:

    from watt_progress import report
    report(step=step, samples=step * global_batch, loss=loss.item())

`step` (steps completed) is required; `samples` and `loss` are understood; any other numeric
keyword (learning rate, tokens, ...) is passed along as it is.
"""
import json
import os
import socket

_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
_socket.setblocking(False)


def report(step, samples=None, loss=None, **extra):
    """Send one progress report; a no-op outside Watt."""
    path = os.environ.get("WATT_PROGRESS_SOCKET")
    if not path:
        return
    body = {"step": int(step), "samples": None if samples is None else int(samples), "loss": loss, **extra}
    try:
        _socket.sendto(json.dumps(body).encode(), path)
    except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
        pass  # the agent is behind or away: progress is advisory, training is not
