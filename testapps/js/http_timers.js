// An HTTP server with timers for testapps/tests/servers.rs: `node http_timers.js PORT`.
//
// Listens on 127.0.0.1:PORT and prints `LISTENING PORT` on stderr. `GET /page` is answered at
// the next tick of a 10 ms interval timer (so a restored event loop must have its timers as
// well as its sockets) with the same page each time; `GET /stop` answers `bye`, stops the
// timer and the server, and the process exits with status 3 from a one-shot timer.
'use strict';
const http = require('http');

const port = Number(process.argv[2]);
const page = 'a page from node\n'.repeat(400);
let waiting = [];
const ticker = setInterval(() => {
  for (const res of waiting) res.end(page);
  waiting = [];
}, 10);

const server = http.createServer((req, res) => {
  if (req.url === '/stop') {
    res.end('bye\n');
    clearInterval(ticker);
    server.close();
    setTimeout(() => process.exit(3), 10);
  } else if (req.url === '/page') {
    waiting.push(res);
  } else {
    res.statusCode = 404;
    res.end('not found\n');
  }
});
server.listen(port, '127.0.0.1', () => console.error(`LISTENING ${port}`));
