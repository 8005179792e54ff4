"""The SMSC of `scripts/bench --operator smpp`: the tests' SMSC (tests/smsc.py, on smpp34's
codec) answering every submit_sm at once and sending a DELIVRD receipt for it.

`python smsc.py SMPP_PORT COUNT_PORT`; `GET /count` on COUNT_PORT returns
`{"submit_sm": N, "receipts": M}` (receipts acknowledged by the gateway). It runs in its own
process, like the callback receiver: it stands for a network on other machines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.smsc import Smsc  # the repository's root is on the path above


async def serve(smpp_port: int, count_port: int) -> None:
    smsc = Smsc()
    smsc.keep = False
    smsc.auto_receipt, smsc.receipt_delay = "DELIVRD", 0.0
    await smsc.start(smpp_port)

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps({"submit_sm": smsc.submit_count,
                           "receipts": smsc.receipts_acknowledged}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    counter = await asyncio.start_server(count, "127.0.0.1", count_port)
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    counter.close()
    await smsc.stop()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
