// An HTTP server on a socket held by oxmgr (see server.py for the idea).
//
//   python3 oxmgr.py start "node examples/listen/server.js" --name web \
//       --listen tcp://127.0.0.1:8000 --instances 2
//   python3 oxmgr.py reload web
//
// Node listens on a passed descriptor with { fd: 3 }. Without --wait-ready,
// a reload counts the replacement ready once it has stayed up min_uptime (1s).
const http = require("http");

if (process.env.LISTEN_PID !== String(process.pid) || Number(process.env.LISTEN_FDS || 0) < 1) {
  console.error("no socket from oxmgr: start me with --listen tcp://HOST:PORT");
  process.exit(1);
}

const server = http.createServer((req, res) => {
  res.setHeader("Connection", "close");
  res.end(`pid ${process.pid}\n`);
});
server.listen({ fd: 3 }, () => console.log(`serving on fd 3 as pid ${process.pid}`));

// SIGTERM (oxmgr's stop): stop accepting, finish what is in flight, exit.
process.on("SIGTERM", () => server.close(() => process.exit(0)));
