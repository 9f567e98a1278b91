#!/usr/bin/env python3
"""Whole-process benchmarks of taskrunner (issue 8), measured side by side with their references.

Prints one table (figure, value, target, reference measured in the same run, ratio) and writes it as JSON to
target/bench/results.json. BENCH_SMOKE=1 runs every figure with tiny sizes (seconds) so that the harness cannot
rot; the smoke run never judges targets. This is a benchmark, not a test: it exits 0 whatever the figures are,
and non-zero only when the harness itself breaks (a binary does not start, a task is lost).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BIN", ROOT / "target" / "release"))
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
OUT = ROOT / "target" / "bench"
JAVA_DIR = OUT / "java"

ENV = dict(os.environ)
for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    ENV.pop(k, None)
ENV["NO_PROXY"] = "127.0.0.1,localhost"
ENV.setdefault("RUST_LOG", "warn")
if os.geteuid() == 0:
    # taskrunner refuses to run tasks as root unless told so; the benchmark's trivial tasks may.
    ENV["TASKRUNNER_USER"] = "root"
    ENV["TASKRUNNER_ALLOW_ROOT"] = "true"

MIB = 1024 * 1024


def sizes():
    if SMOKE:
        return dict(idle_s=3, tasks=40, capture_bytes=16 * MIB, sleepers=50, handout=200, sql_rows=0)
    return dict(idle_s=60, tasks=2000, capture_bytes=1024 * MIB, sleepers=1000, handout=4000, sql_rows=0)


# ---------------------------------------------------------------- process helpers

def proc_status(pid):
    """VmRSS/VmHWM in bytes and context switches summed over all threads."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    vol = invol = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except FileNotFoundError:
            pass
    out["ctxt"] = vol + invol
    return out


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def wait_peak_rss(proc, interval):
    """Waits for `proc` to exit; returns its peak RSS (VmHWM) in bytes, sampled every `interval` s."""
    peak = 0
    while proc.p.poll() is None:
        try:
            peak = max(peak, proc_status(proc.pid)["VmHWM"])
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
        time.sleep(interval)
    return peak


class Proc:
    def __init__(self, args, cwd=None, env=None, stdout=subprocess.PIPE):
        self.p = subprocess.Popen(args, cwd=cwd, env=env or ENV, stdout=stdout, stderr=subprocess.PIPE, text=True)
        self.stderr_lines = []
        threading.Thread(target=self._drain_err, daemon=True).start()

    def _drain_err(self):
        for line in self.p.stderr:
            if len(self.stderr_lines) < 200:
                self.stderr_lines.append(line)

    @property
    def pid(self):
        return self.p.pid

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Endpoint:
    """A datapipeline-local on a free loopback port."""

    def __init__(self, work, credentials=None, extra=()):
        args = [str(BIN / "datapipeline-local"), "serve", "--listen", "127.0.0.1:0"]
        if credentials:
            args += ["--credentials", str(credentials)]
        args += list(extra)
        self.proc = Proc(args, cwd=work)
        line = self.proc.p.stdout.readline()
        m = re.match(r"listening on (http://\S+)", line)
        if not m:
            raise SystemExit(f"datapipeline-local did not start: {line!r} {''.join(self.proc.stderr_lines)}")
        self.url = m.group(1)
        self.credentials = credentials

    def submit(self, definition_path):
        args = [str(BIN / "datapipeline-local"), "submit", "--endpoint", self.url]
        if self.credentials:
            args += ["--credentials", str(self.credentials)]
        out = subprocess.run(args + [str(definition_path)], env=ENV, check=True, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    def stop(self):
        self.proc.stop()


def write_credentials(work):
    path = Path(work) / "credentials.json"
    path.write_text(json.dumps({"access-id": "AKIDBENCH", "private-key": "benchsecretbenchsecretbenchsecret"}))
    path.chmod(0o600)
    return path


def pipeline_file(work, name, commands, worker_group="wg-bench"):
    objects = [{"id": "Default", "name": "Default", "scheduleType": "ondemand", "failureAndRerunMode": "CASCADE",
                "workerGroup": worker_group}]
    for i, cmd in enumerate(commands):
        objects.append({"id": f"A{i}", "name": f"A{i}", "type": "ShellCommandActivity", "command": cmd})
    path = Path(work) / f"{name}.json"
    path.write_text(json.dumps({"objects": objects}))
    return path


def submit_tasks(ep, work, commands, per_pipeline=100, worker_group="wg-bench"):
    ids = []
    for start in range(0, len(commands), per_pipeline):
        f = pipeline_file(work, f"p{start}", commands[start:start + per_pipeline], worker_group)
        ids.append(ep.submit(f))
    return ids


def taskrunner(ep, work, *extra, env=None):
    args = [str(BIN / "taskrunner"), "--config", str(ep.credentials), "--workerGroup=wg-bench",
            "--region=us-east-1", "--endpoint", ep.url, "--settings", "/dev/null", "--output", str(Path(work) / "output")]
    args += list(extra)
    return Proc(args, cwd=work, env=env, stdout=subprocess.DEVNULL)


def java_stand_in(ep_url):
    JAVA_DIR.mkdir(parents=True, exist_ok=True)
    if not (JAVA_DIR / "JvmPoller.class").exists():
        subprocess.run(["javac", "-d", str(JAVA_DIR), str(ROOT / "bench" / "JvmPoller.java")], check=True)
    return Proc(["java", "-cp", str(JAVA_DIR), "JvmPoller", ep_url, "wg-empty"])


# ---------------------------------------------------------------- figures

ROWS = []


def row(figure, value, unit, target=None, ok=None, reference=None, ratio=None, note=""):
    ROWS.append(dict(figure=figure, value=value, unit=unit, target=target, met=None if SMOKE else ok,
                     reference=reference, ratio=ratio, note=note))


def fig_idle(work):
    """Idle RSS, CPU and wakeups: --tasks 2 long-polling an empty worker group, vs the JVM stand-in."""
    s = sizes()
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    open_ep = Endpoint(work)  # no --credentials: accepts the stand-in's unsigned-but-well-formed requests
    try:
        tr = taskrunner(ep, work, "--tasks", "2")
        jv = java_stand_in(open_ep.url)
        time.sleep(1)
        c0 = {p: (cpu_seconds(p.pid), proc_status(p.pid)["ctxt"]) for p in (tr, jv)}
        t0 = time.monotonic()
        time.sleep(s["idle_s"])
        wall = time.monotonic() - t0
        res = {}
        for p in (tr, jv):
            st = proc_status(p.pid)
            cpu = cpu_seconds(p.pid) - c0[p][0]
            res[p] = dict(rss=st["VmRSS"], cpu_pct=100 * cpu / wall, wakeups=(st["ctxt"] - c0[p][1]) / wall)
        a, b = res[tr], res[jv]
        row(f"idle RSS after {s['idle_s']} s, --tasks 2", round(a["rss"] / MIB, 1), "MiB", "<= 8 MiB",
            a["rss"] <= 8 * MIB, f"JVM stand-in {b['rss'] / MIB:.1f} MiB", round(a["rss"] / b["rss"], 3))
        row(f"idle CPU over {s['idle_s']} s", round(a["cpu_pct"], 4), "% of wall", "<= 0.1 %",
            a["cpu_pct"] <= 0.1, f"JVM stand-in {b['cpu_pct']:.4f} %")
        row("idle wakeups (context switches, all threads)", round(a["wakeups"], 2), "/s", "stated", True,
            f"JVM stand-in {b['wakeups']:.2f}/s")
        tr.stop(), jv.stop()
    finally:
        ep.stop(), open_ep.stop()


def fig_ready(work):
    """Start to READY=1 (NOTIFY_SOCKET bound here), vs the JVM stand-in's start to first poll."""
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    open_ep = Endpoint(work)
    try:
        sock_path = str(Path(work) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(10)
        samples = []
        for _ in range(3 if SMOKE else 10):
            env = dict(ENV, NOTIFY_SOCKET=sock_path)
            t0 = time.monotonic()
            tr = taskrunner(ep, work, "--tasks", "2", env=env)
            while True:
                msg = sock.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    break
            samples.append(time.monotonic() - t0)
            tr.stop()
        ours = sorted(samples)[len(samples) // 2]
        t0 = time.monotonic()
        jv = java_stand_in(open_ep.url)
        jv.p.stdout.readline()
        theirs = time.monotonic() - t0
        jv.stop()
        row("start to READY=1 (median)", round(ours * 1000, 1), "ms", "<= 20 ms", ours <= 0.020,
            f"JVM stand-in start to first poll {theirs * 1000:.0f} ms", round(ours / theirs, 3))
    finally:
        ep.stop(), open_ep.stop()


def run_tasks(work, n, tasks, command="true"):
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    try:
        submit_tasks(ep, work, [command] * n)
        t0 = time.monotonic()
        tr = taskrunner(ep, work, "--tasks", str(tasks), "--exit-after-tasks", str(n))
        rc = tr.p.wait(timeout=3600)
        dt = time.monotonic() - t0
        if rc != 0:
            raise SystemExit(f"taskrunner exited {rc}: {''.join(tr.stderr_lines[-20:])}")
        return n / dt
    finally:
        ep.stop()


def fig_throughput(work):
    s = sizes()
    n = s["tasks"]
    limit = None
    limit_bin = BIN / "examples" / "bench-limit"
    if limit_bin.exists():
        creds = write_credentials(work)
        ep = Endpoint(work, creds)
        try:
            submit_tasks(ep, work, ["true"] * n)
            out = subprocess.run([str(limit_bin), ep.url, str(creds), "wg-bench", str(n), "8"], env=ENV,
                                 capture_output=True, text=True, check=True)
            limit = float(out.stdout.strip().splitlines()[-1])
        finally:
            ep.stop()
    def in_dir(name, count, tasks):
        d = Path(work) / name
        d.mkdir()
        return run_tasks(d, count, tasks)

    r8 = in_dir("t8", n, 8)
    r1 = in_dir("t1", max(n // 10, 10), 1)
    r32 = in_dir("t32", n, 32)
    ref = f"limit loop {limit:.0f}/s; --tasks 1 {r1:.0f}/s; --tasks 32 {r32:.0f}/s" if limit else \
        f"limit loop not built; --tasks 1 {r1:.0f}/s; --tasks 32 {r32:.0f}/s"
    row(f"{n} trivial tasks, --tasks 8", round(r8, 1), "tasks/s", ">= 0.8 x limit loop",
        (r8 >= 0.8 * limit) if limit else None, ref, round(r8 / limit, 3) if limit else None)


def fig_capture(work):
    s = sizes()
    nbytes = s["capture_bytes"]
    producer = f"head -c {nbytes} /dev/zero"
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", f"{producer} > {work}/ref.out"], check=True)
    ref = time.monotonic() - t0
    os.unlink(f"{work}/ref.out")
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    try:
        submit_tasks(ep, work, [producer])
        t0 = time.monotonic()
        tr = taskrunner(ep, work, "--tasks", "1", "--exit-after-tasks", "1")
        peak = wait_peak_rss(tr, 0.05)
        dt = time.monotonic() - t0
        got = sum(p.stat().st_size for p in (Path(work) / "output" / "tasks").rglob("stdout"))
        if got != nbytes:
            raise SystemExit(f"capture lost bytes: {got} of {nbytes}")
        mib = nbytes / MIB
        row(f"capture {mib:.0f} MiB of stdout", round(mib / dt, 1), "MiB/s", ">= 0.9 x sh redirect",
            (ref / dt) >= 0.9, f"sh -c 'producer > file' {mib / ref:.0f} MiB/s", round(ref / dt, 3))
        row("capture: runner peak RSS", round(peak / MIB, 1), "MiB", "<= 16 MiB", peak <= 16 * MIB)
    finally:
        ep.stop()


def fig_sigterm(work):
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    try:
        samples = []
        for _ in range(3 if SMOKE else 10):
            tr = taskrunner(ep, work, "--tasks", "2")
            time.sleep(1.0)
            t0 = time.monotonic()
            tr.p.send_signal(signal.SIGTERM)
            tr.p.wait(timeout=30)
            samples.append(time.monotonic() - t0)
        med = sorted(samples)[len(samples) // 2]
        row("SIGTERM while idle to exit (median)", round(med * 1000, 1), "ms", "<= 100 ms", med <= 0.1)
    finally:
        ep.stop()


def fig_sleepers(work):
    s = sizes()
    n = s["sleepers"]
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    try:
        submit_tasks(ep, work, ["sleep 20"] * n)
        tr = taskrunner(ep, work, "--tasks", str(n), "--exit-after-tasks", str(n))
        peak = wait_peak_rss(tr, 0.2)
        if tr.p.returncode != 0:
            raise SystemExit(f"taskrunner exited {tr.p.returncode}")
        row(f"{n} concurrent sleep tasks: runner peak RSS", round(peak / MIB, 1), "MiB", "<= 64 MiB",
            peak <= 64 * MIB, note=f"{peak / n / 1024:.0f} KiB per running task")
    finally:
        ep.stop()


def fig_handout(work):
    """datapipeline-local's hand-out rate to 8 concurrent pollers (boto-free: our own signed client)."""
    s = sizes()
    n = s["handout"]
    creds = write_credentials(work)
    ep = Endpoint(work, creds)
    try:
        submit_tasks(ep, work, ["true"] * n)
        t0 = time.monotonic()
        # 8 runners with --tasks 1 would measure the runner; measure the endpoint with the limit loop instead.
        limit_bin = BIN / "examples" / "bench-limit"
        if not limit_bin.exists():
            row("datapipeline-local hand-out rate, 8 pollers", None, "tasks/s", ">= 20/s", None,
                note="examples/bench-limit not built")
            return
        subprocess.run([str(limit_bin), ep.url, str(creds), "wg-bench", str(n), "8", "--no-spawn"], env=ENV,
                       check=True, capture_output=True)
        rate = n / (time.monotonic() - t0)
        row("datapipeline-local hand-out rate, 8 pollers", round(rate, 1), "tasks/s", ">= 20/s (10 x 2/s)",
            rate >= 20)
    finally:
        ep.stop()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    figures = [fig_ready, fig_sigterm, fig_idle, fig_throughput, fig_capture, fig_sleepers, fig_handout]
    only = os.environ.get("BENCH_ONLY")
    t_start = time.monotonic()
    for fig in figures:
        if only and fig.__name__ not in only.split(","):
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{fig.__name__}-") as work:
            try:
                fig(work)
            except SystemExit as e:
                row(fig.__name__, None, "", note=f"harness error: {e}")
    width = max(len(r["figure"]) for r in ROWS)
    print(f"\n{'figure':<{width}}  {'value':>10} {'unit':<10} {'target':<22} {'met':<5} reference (same run)")
    for r in ROWS:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        val = "" if r["value"] is None else r["value"]
        ref = (r["reference"] or "") + (f" (ratio {r['ratio']})" if r["ratio"] is not None else "")
        note = f" [{r['note']}]" if r["note"] else ""
        print(f"{r['figure']:<{width}}  {val!s:>10} {r['unit']:<10} {r['target'] or '':<22} {met:<5} {ref}{note}")
    result = dict(smoke=SMOKE, machine=dict(cores=os.cpu_count(), uname=" ".join(os.uname())),
                  seconds=round(time.monotonic() - t_start, 1), rows=ROWS)
    (OUT / ("smoke.json" if SMOKE else "results.json")).write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {OUT / ('smoke.json' if SMOKE else 'results.json')}")
    broken = [r for r in ROWS if r["note"].startswith("harness error")]
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
