#!/usr/bin/env bash
# The README's main job, on the embedded default: starts datapipeline-local on a free loopback port,
# submits examples/create-directory.json (the guide's CreateDirectory ShellCommandActivity on worker
# group wg-12345), runs taskrunner against it until the task is handled, prints what happened and
# where the logs are, and exits 0 only when the attempt ended FINISHED.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
WORK=${DEMO_DIR:-$PWD/output/demo}
rm -rf "$WORK"; mkdir -p "$WORK"
# Loopback traffic must not go through a proxy the environment may set.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy

# A throwaway key pair: datapipeline-local verifies SigV4 against it, taskrunner signs with it.
umask 077
cat >"$WORK/credentials.json" <<JSON
{ "access-id": "AKIDDEMO$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)", "private-key": "$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')" }
JSON
umask 022

"$BIN/datapipeline-local" serve --listen 127.0.0.1:0 --credentials "$WORK/credentials.json" \
  >"$WORK/datapipeline-local.out" 2>"$WORK/datapipeline-local.log" &
DPL=$!
trap 'kill $DPL 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  URL=$(sed -n 's/^listening on //p' "$WORK/datapipeline-local.out" | head -1)
  [ -n "$URL" ] && break
  kill -0 $DPL 2>/dev/null || { cat "$WORK/datapipeline-local.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "${URL:-}" ] || { echo "datapipeline-local did not start" >&2; exit 1; }
echo "== datapipeline-local is listening on $URL"

PIPELINE=$("$BIN/datapipeline-local" submit --endpoint "$URL" --credentials "$WORK/credentials.json" \
  examples/create-directory.json)
echo "== submitted examples/create-directory.json as pipeline $PIPELINE"

# Keep the attempt's working directory, so that the directory the task created can be shown.
export TASKRUNNER_KEEP_WORKDIRS=always
if [ "$(id -u)" = 0 ]; then
  # taskrunner refuses to run tasks as root unless told so. A service runs them as the `taskrunner` user;
  # this demo, started by root by hand, says explicitly that its one task may run as root.
  echo "== you are root: this demo sets TASKRUNNER_USER=root TASKRUNNER_ALLOW_ROOT=true (a service never needs it)"
  export TASKRUNNER_USER=root TASKRUNNER_ALLOW_ROOT=true
fi
echo "== running taskrunner --workerGroup=wg-12345 until one task is handled"
(cd "$WORK" && "$OLDPWD/$BIN/taskrunner" --config credentials.json --workerGroup=wg-12345 --region=us-east-1 \
  --endpoint "$URL" --exit-after-tasks 1 --exit-after-idle 120s --settings /dev/null) || {
  echo "taskrunner exited with $?" >&2; exit 1; }

echo "== what datapipeline-local recorded:"
RUNS=$("$BIN/datapipeline-local" runs --endpoint "$URL" --credentials "$WORK/credentials.json" "$PIPELINE")
echo "$RUNS"
echo
echo "== logs:"
echo "   hourly runner log:  $(ls -d "$WORK"/output/logs/TaskRunner.log.* 2>/dev/null | head -1)"
echo "   attempt logs:       $(dirname "$(find "$WORK/output/tasks" -name stdout 2>/dev/null | head -1)" 2>/dev/null)"
echo "   endpoint's log:     $WORK/datapipeline-local.log"
CREATED=$(find "$WORK/output" -type d -name created-directory 2>/dev/null | head -1)
echo "== the task created: ${CREATED:-(nothing found)}"
grep -q FINISHED <<<"$RUNS" || { echo "the attempt did not end FINISHED" >&2; exit 1; }
echo "== FINISHED"
