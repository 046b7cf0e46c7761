"""An asyncio TCP server for testapps/tests/servers.rs: `asyncio_echo.py PORT`.

Listens on 127.0.0.1:PORT and prints LISTENING on stderr. Each client sends lines; each line is
answered `echo LINE` after an asyncio timer (a short `asyncio.sleep`), so a restored event loop
must have its timers as well as its sockets; an empty line (or end of file) ends the
connection. A client that sends `stop` gets `bye`, and the server closes its listener and exits
with status 4.
"""

import asyncio
import sys


async def serve(stop, reader, writer):
    while (line := await reader.readline()) not in (b"", b"\n"):
        if line == b"stop\n":
            writer.write(b"bye\n")
            await writer.drain()
            stop.set()
            break
        await asyncio.sleep(0.001)
        writer.write(b"echo " + line)
        await writer.drain()
    writer.close()


async def main(port):
    stop = asyncio.Event()
    server = await asyncio.start_server(
        lambda r, w: serve(stop, r, w), "127.0.0.1", port
    )
    print("LISTENING", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    return 4


sys.exit(asyncio.run(main(int(sys.argv[1]))))
