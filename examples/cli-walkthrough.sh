#!/bin/sh
# A walk through the oxmgr command line, one step per command.
#
#   sh examples/cli-walkthrough.sh
#
# It uses its own OXMGR_HOME (a temporary directory) unless you set one, and
# stops its daemon at the end, so it leaves nothing running. The "app" is
# Python's built-in web server, so there is nothing to install.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
ox="${PYTHON:-python3} $here/../oxmgr.py"
if [ -z "${OXMGR_HOME:-}" ]; then
    OXMGR_HOME=$(mktemp -d)
    export OXMGR_HOME
    trap 'rm -rf "$OXMGR_HOME"' EXIT
fi
port=${PORT:-8765}

step() { printf '\n$ oxmgr %s\n' "$*"; $ox "$@"; }

# Start an app. The first command also starts the daemon, in the background,
# in its own session; it keeps running after this shell exits. The command is
# exec'd directly (no shell), so the pid oxmgr shows is the server's own.
step start "${PYTHON:-python3} -m http.server $port --bind 127.0.0.1" --name web --restart always

# A shell pipeline is fine too: shell syntax runs under /bin/sh -c.
step start "while true; do date; sleep 1; done | cat" --name clock --namespace demo

# The table: ID NAME NAMESPACE STATUS PID UPTIME RESTARTS CPU% RAM HEALTH.
step list

# Everything about one app; "--json" gives the same as JSON for scripts.
# Environment values are never printed, only the names you set with --env.
step status web

# Kill the server behind oxmgr's back: under "--restart always" it is back at
# once with a new pid, and RESTARTS counts it.
pid=$($ox status web --json | ${PYTHON:-python3} -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
kill -9 "$pid"
step list

# Logs live in $OXMGR_HOME/logs/<name>.out.log and .err.log, rotated by size
# while the app runs (OXMGR_LOG_MAX_SIZE_MB, _MAX_FILES, _MAX_DAYS).
step logs clock --lines 3

# Targets: a name, an id, a namespace ("demo"), several at once, or "all".
step stop demo
step restart web
step delete all

# Stop the daemon. Apps that were running when a daemon stops run again when
# the next one starts; "stop" and "delete" are what make an app stay down.
step daemon stop
