#!/usr/bin/env python3
"""Packaging tests (`make test-packaging`): the unit, the .deb, the .rpm, the signed apt repository,
the launchd plists and the Homebrew formula, and the user's journey under a real systemd in a
systemd-nspawn container.

Needs root, the packages built (`make deb rpm`) and the tools from scripts/setup-test-deps.sh.
The Debian root for the container is debootstrapped once into $TASKRUNNER_DEBIAN_ROOT
(default .cache/debian-root) and reused; every test works on a throwaway copy of it.

Prints one line per test and closes with `N passed, N failed, N skipped`; exits 1 on any failure.
"""

import glob
import hashlib
import json
import os
import plistlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "packaging")
CACHE_ROOT = os.environ.get("TASKRUNNER_DEBIAN_ROOT", os.path.join(ROOT, ".cache", "debian-root"))
SUITE = "bookworm"
# The exposure `systemd-analyze security` gives taskrunner@.service; pinned so it cannot rise.
SECURITY_THRESHOLD = 11  # tenths: 1.1
JOURNEY_TIMEOUT_S = 420
TIMINGS = {}


def run(cmd, check=True, timeout=300, **kw):
    """Runs cmd, returns CompletedProcess with text stdout/stderr; raises with both on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return p


def one(pattern, what):
    found = sorted(glob.glob(os.path.join(ROOT, pattern)))
    if not found:
        raise AssertionError(f"no {what} ({pattern}): run `make deb rpm` first")
    return found[-1]


def deb_path():
    return one("target/debian/taskrunner_*.deb", ".deb")


def rpm_path():
    return one("target/rpm/RPMS/*/taskrunner-*.rpm", ".rpm")


def debian_root():
    """The cached Debian root, debootstrapped on first use (about 45 s)."""
    if not os.path.isdir(os.path.join(CACHE_ROOT, "usr")):
        t0 = time.monotonic()
        tmp = CACHE_ROOT + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(CACHE_ROOT), exist_ok=True)
        run(["debootstrap", "--variant=minbase",
             "--include=systemd,systemd-sysv,dbus,procps,ca-certificates", SUITE, tmp], timeout=900)
        os.rename(tmp, CACHE_ROOT)
        TIMINGS["debootstrap"] = time.monotonic() - t0
    return CACHE_ROOT


class Scratch:
    """A throwaway copy of the cached Debian root."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="taskrunner-root-")
        self.root = os.path.join(self.dir, "root")
        run(["cp", "-a", "--reflink=auto", debian_root(), self.root])
        return self.root

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


def nspawn_run(root, *cmd, binds=()):
    # --keep-unit: no host systemd to ask for a scope (CI runs in a container).
    args = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root]
    for b in binds:
        args.append(f"--bind-ro={b}")
    return run(args + list(cmd), check=False)


EXPECTED_DEB_FILES = {
    "etc/taskrunner/config.toml",
    "lib/systemd/system/taskrunner@.service",
    "usr/bin/datapipeline-local",
    "usr/bin/taskrunner",
    "usr/bin/taskrunner-ctl",
    "usr/lib/sysusers.d/taskrunner.conf",
    "usr/lib/tmpfiles.d/taskrunner.conf",
    "usr/share/bash-completion/completions/datapipeline-local",
    "usr/share/bash-completion/completions/taskrunner",
    "usr/share/bash-completion/completions/taskrunner-ctl",
    "usr/share/doc/taskrunner/changelog.Debian.gz",
    "usr/share/doc/taskrunner/copyright",
    "usr/share/doc/taskrunner/examples/credentials.json.example",
    "usr/share/doc/taskrunner/examples/dropins/no-credentials-file.conf",
    "usr/share/doc/taskrunner/examples/dropins/restrict-ip.conf",
    "usr/share/doc/taskrunner/examples/dropins/strict-no-jit.conf",
    "usr/share/doc/taskrunner/examples/dropins/writable-data-dir.conf",
    "usr/share/fish/vendor_completions.d/datapipeline-local.fish",
    "usr/share/fish/vendor_completions.d/taskrunner-ctl.fish",
    "usr/share/fish/vendor_completions.d/taskrunner.fish",
    "usr/share/lintian/overrides/taskrunner",
    "usr/share/man/man1/datapipeline-local.1.gz",
    "usr/share/man/man1/taskrunner-ctl.1.gz",
    "usr/share/man/man8/taskrunner.8.gz",
    "usr/share/zsh/vendor-completions/_datapipeline-local",
    "usr/share/zsh/vendor-completions/_taskrunner",
    "usr/share/zsh/vendor-completions/_taskrunner-ctl",
}

EXPECTED_RPM_FILES = {
    "/etc/taskrunner",
    "/etc/taskrunner/config.toml",
    "/run/taskrunner",
    "/usr/bin/datapipeline-local",
    "/usr/bin/taskrunner",
    "/usr/bin/taskrunner-ctl",
    "/usr/lib/systemd/system/taskrunner@.service",
    "/usr/lib/sysusers.d/taskrunner.conf",
    "/usr/lib/tmpfiles.d/taskrunner.conf",
    "/usr/share/bash-completion/completions/datapipeline-local",
    "/usr/share/bash-completion/completions/taskrunner",
    "/usr/share/bash-completion/completions/taskrunner-ctl",
    "/usr/share/doc/taskrunner/examples",
    "/usr/share/doc/taskrunner/examples/credentials.json.example",
    "/usr/share/doc/taskrunner/examples/dropins",
    "/usr/share/doc/taskrunner/examples/dropins/no-credentials-file.conf",
    "/usr/share/doc/taskrunner/examples/dropins/restrict-ip.conf",
    "/usr/share/doc/taskrunner/examples/dropins/strict-no-jit.conf",
    "/usr/share/doc/taskrunner/examples/dropins/writable-data-dir.conf",
    "/usr/share/fish/vendor_completions.d/datapipeline-local.fish",
    "/usr/share/fish/vendor_completions.d/taskrunner-ctl.fish",
    "/usr/share/fish/vendor_completions.d/taskrunner.fish",
    "/usr/share/man/man1/datapipeline-local.1.gz",
    "/usr/share/man/man1/taskrunner-ctl.1.gz",
    "/usr/share/man/man8/taskrunner.8.gz",
    "/usr/share/zsh/vendor-completions/_datapipeline-local",
    "/usr/share/zsh/vendor-completions/_taskrunner",
    "/usr/share/zsh/vendor-completions/_taskrunner-ctl",
}


class T1Unit(unittest.TestCase):
    """taskrunner@.service: hardening score and `systemd-analyze verify` in a root with the .deb."""

    def _security(self, unit_text):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "taskrunner@wg-12345.service")
            with open(path, "w") as f:
                f.write(unit_text)
            return run(["systemd-analyze", "security", "--offline=true", f"--threshold={SECURITY_THRESHOLD}",
                        "--no-pager", path], check=False)

    def test_security_exposure_pinned(self):
        with open(os.path.join(ROOT, "systemd", "taskrunner@.service")) as f:
            text = f.read()
        p = self._security(text)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
        self.assertIsNotNone(m, p.stdout[-500:] + p.stderr)
        print(f"    exposure {m.group(1)} (threshold {SECURITY_THRESHOLD / 10})", file=sys.stderr)
        self.assertEqual(p.returncode, 0, f"exposure {m.group(1)} is over {SECURITY_THRESHOLD / 10}")
        # The threshold bites: the same unit without its sandbox exceeds it.
        weak = re.sub(r"^(ProtectSystem|PrivateUsers|SystemCallFilter)=.*$", "", text, flags=re.M)
        self.assertNotEqual(self._security(weak).returncode, 0, "--threshold did not catch a weaker unit")

    def test_verify_in_root_with_package(self):
        with Scratch() as root:
            deb = deb_path()
            p = nspawn_run(root, "dpkg", "-i", f"/pkg/{os.path.basename(deb)}",
                           binds=[f"{os.path.dirname(deb)}:/pkg"])
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            # systemd-analyze verify exits 0 on unknown keys and bad values: any stderr fails.
            v = run(["systemd-analyze", "verify", f"--root={root}", "--man=no", "taskrunner@wg-12345.service"],
                    check=False)
            self.assertEqual((v.returncode, v.stderr), (0, ""), v.stdout)
            # ... and it does report a broken unit (so an empty stderr above means something).
            unit = os.path.join(root, "lib/systemd/system/taskrunner@.service")
            with open(unit, "a") as f:
                f.write("[Service]\nProtectSystm=strict\n")
            v = run(["systemd-analyze", "verify", f"--root={root}", "--man=no", "taskrunner@wg-12345.service"],
                    check=False)
            self.assertIn("ProtectSystm", v.stderr)
            # sysusers.d: the user and group it declares, parsed by systemd-sysusers itself.
            s = run(["systemd-sysusers", f"--root={root}", "--cat-config"], check=False)
            self.assertIn("u taskrunner -:taskrunner", s.stdout)
            with open(os.path.join(root, "etc/passwd")) as f:
                self.assertRegex(f.read(), r"(?m)^taskrunner:x:\d+:\d+:[^:]*:/var/lib/taskrunner:/usr/sbin/nologin$")


class T2Deb(unittest.TestCase):
    def test_files(self):
        out = run(["dpkg-deb", "-c", deb_path()]).stdout
        files = {line.split()[-1].lstrip("./") for line in out.splitlines() if not line.startswith("d")}
        self.assertEqual(files, EXPECTED_DEB_FILES)

    def test_control_and_conffiles(self):
        deb = deb_path()
        depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
        for dep in ("libc6", "ca-certificates", "procps"):
            self.assertIn(dep, depends)
        self.assertEqual(run(["dpkg-deb", "-I", deb, "conffiles"]).stdout.split(), ["/etc/taskrunner/config.toml"])
        for script in ("postinst", "prerm", "postrm"):
            self.assertTrue(run(["dpkg-deb", "-I", deb, script]).stdout.startswith("#!/bin/sh"))
        postinst = run(["dpkg-deb", "-I", deb, "postinst"]).stdout
        postinst = re.sub(r"(?m)^\s*#.*$", "", postinst)  # comments may name the admin's command
        self.assertNotRegex(postinst, r"systemctl[^\n]*\b(enable|start)\b", "postinst must never enable or start")
        self.assertIn("try-restart 'taskrunner@*.service'", postinst)

    def test_lintian_no_errors(self):
        p = run(["lintian", "--fail-on", "error,warning", deb_path()], check=False)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


class T3Rpm(unittest.TestCase):
    def test_files(self):
        out = run(["rpm", "-qpl", rpm_path()]).stdout.split()
        files = {f for f in out if not f.startswith("/usr/lib/.build-id") and not f.startswith("/usr/share/licenses")}
        self.assertEqual(files, EXPECTED_RPM_FILES)

    def test_scripts(self):
        out = run(["rpm", "-qp", "--scripts", rpm_path()]).stdout
        sections = dict(re.findall(r"(?ms)^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", out))
        self.assertEqual(set(sections), {"preinstall", "postinstall", "preuninstall", "postuninstall"})
        self.assertIn("systemd-sysusers --replace=/usr/lib/sysusers.d/taskrunner.conf", sections["preinstall"])
        self.assertIn("u taskrunner -:taskrunner", sections["preinstall"])
        self.assertIn("systemd-tmpfiles --create", sections["postinstall"])
        self.assertNotRegex(sections["postinstall"], r"systemctl[^\n]*\b(enable|start)\b")
        self.assertIn("systemctl stop 'taskrunner@*.service'", sections["preuninstall"])
        self.assertIn("try-restart 'taskrunner@*.service'", sections["postuninstall"])

    def test_install_into_root(self):
        with Scratch() as root:
            # --nodeps: the rpm database of a Debian root lists no packages (libc, systemd are there).
            # The scriptlets run chrooted; systemd-tmpfiles needs /proc, as on a real system.
            run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")])
            try:
                p = run(["rpm", "--root", root, "--nodeps", "-i", rpm_path()], check=False)
            finally:
                run(["umount", os.path.join(root, "proc")])
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertTrue(os.access(os.path.join(root, "usr/bin/taskrunner"), os.X_OK))
            self.assertTrue(os.path.isfile(os.path.join(root, "usr/lib/systemd/system/taskrunner@.service")))
            with open(os.path.join(root, "etc/passwd")) as f:
                self.assertRegex(f.read(), r"(?m)^taskrunner:x:\d+:\d+:")  # %pre ran sysusers in the root
            self.assertTrue(os.path.isdir(os.path.join(root, "var/lib/taskrunner")))  # %post ran tmpfiles
            q = run(["rpm", "--root", root, "-q", "taskrunner"])
            self.assertTrue(q.stdout.startswith("taskrunner-"))
            e = run(["rpm", "--root", root, "--nodeps", "-e", "taskrunner"], check=False)
            self.assertEqual(e.returncode, 0, e.stdout + e.stderr)
            self.assertFalse(os.path.exists(os.path.join(root, "usr/bin/taskrunner")))


class AptRepo:
    """A signed repository built with `make apt-repo`'s script and a throwaway key."""

    dir = None

    @classmethod
    def build(cls):
        if cls.dir:
            return cls.dir
        cls.tmp = tempfile.mkdtemp(prefix="taskrunner-apt-")
        gnupg = os.path.join(cls.tmp, "gnupg")
        os.makedirs(gnupg, mode=0o700)
        env = dict(os.environ, GNUPGHOME=gnupg)
        run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key",
             "taskrunner test <apt-test@example.org>", "ed25519", "sign", "1d"], env=env)
        repo = os.path.join(cls.tmp, "repo")
        run(["sh", os.path.join(ROOT, "scripts", "build-apt-repo.sh")],
            env=dict(env, APT_SIGNING_KEY="apt-test@example.org", APT_REPO_DIR=repo))
        # The repository is signed: stop the gpg-agent that signing started, or it outlives the tests.
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
        cls.dir = repo
        return repo


class T4AptRepo(unittest.TestCase):
    def test_signed_layout(self):
        repo = AptRepo.build()
        dist = os.path.join(repo, "dists", "stable")
        keyring = os.path.join(repo, "taskrunner-archive-keyring.gpg")
        run(["gpgv", "--keyring", keyring, os.path.join(dist, "InRelease")])
        run(["gpgv", "--keyring", keyring, os.path.join(dist, "Release.gpg"), os.path.join(dist, "Release")])
        arch = run(["dpkg", "--print-architecture"]).stdout.strip()
        with open(os.path.join(dist, "main", f"binary-{arch}", "Packages")) as f:
            packages = f.read()
        self.assertIn("Package: taskrunner\n", packages)
        fname = re.search(r"(?m)^Filename: (.*)$", packages).group(1)
        sha = re.search(r"(?m)^SHA256: (.*)$", packages).group(1)
        with open(os.path.join(repo, fname), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sha)
        with open(os.path.join(dist, "Release")) as f:
            release = f.read()
        self.assertIn(f"main/binary-{arch}/Packages", release)
        # A changed Release no longer verifies.
        with tempfile.TemporaryDirectory() as d:
            forged = os.path.join(d, "Release")
            with open(forged, "w") as f:
                f.write(release.replace("Suite: stable", "Suite: forged"))
            self.assertNotEqual(run(["gpgv", "--keyring", keyring, os.path.join(dist, "Release.gpg"), forged],
                                    check=False).returncode, 0)


class T5Mac(unittest.TestCase):
    formula = os.path.join(ROOT, "packaging", "homebrew", "taskrunner.rb")
    standin = os.path.join(HERE, "homebrew_standin.rb")

    def test_formula_syntax(self):
        run(["ruby", "-c", self.formula])

    def _standin(self, path):
        return run(["ruby", self.standin, path, ROOT], check=False)

    def test_formula_service_plist(self):
        p = self._standin(self.formula)
        self.assertEqual(p.returncode, 0, p.stderr)
        plist = plistlib.loads(p.stdout.encode())
        self.assertEqual(plist["Label"], "homebrew.mxcl.taskrunner")
        self.assertEqual(plist["ProgramArguments"][0], "/opt/homebrew/opt/taskrunner/bin/taskrunner")
        self.assertIn("/opt/homebrew/etc/taskrunner/config.toml", plist["ProgramArguments"])
        self.assertEqual(plist["KeepAlive"], {"SuccessfulExit": False})
        self.assertTrue(plist["StandardOutPath"].startswith("/opt/homebrew/var/log/taskrunner/"))
        self.assertTrue(plist["StandardErrorPath"].startswith("/opt/homebrew/var/log/taskrunner/"))
        self.assertEqual(plist["EnvironmentVariables"]["STATE_DIRECTORY"], "/opt/homebrew/var/lib/taskrunner")
        self.assertIn("cargo", p.stderr)  # install builds with cargo

    def test_standin_catches_mistakes(self):
        with open(self.formula) as f:
            good = f.read()
        mutations = {
            "misspelled service method": ("log_path var", "logpath var"),
            "unknown keep_alive key": ("keep_alive successful_exit:", "keep_alive sucessful_exit:"),
            "misspelled formula method": ("depends_on \"rust\"", "depend_on \"rust\""),
            "bad process_type": ("process_type :background", "process_type :daemon"),
            "missing install source": ("packaging/credentials.json.example", "packaging/credentials.example"),
        }
        with tempfile.TemporaryDirectory() as d:
            for name, (old, new) in mutations.items():
                self.assertIn(old, good, name)
                path = os.path.join(d, "taskrunner.rb")
                with open(path, "w") as f:
                    f.write(good.replace(old, new))
                self.assertNotEqual(self._standin(path).returncode, 0, f"stand-in accepted: {name}")

    def test_launchd_plists(self):
        plists = sorted(glob.glob(os.path.join(ROOT, "launchd", "*.plist")))
        if not plists:
            self.skipTest("launchd/com.taskrunner.taskrunner.plist (the service helper's) is not on this branch yet")
        for path in plists:
            with open(path, "rb") as f:
                plist = plistlib.load(f)  # raises on a broken file, unlike plistutil
            self.assertEqual(plist["Label"] + ".plist", os.path.basename(path))
            self.assertTrue(plist["ProgramArguments"][0].endswith("/taskrunner"), plist["ProgramArguments"])
            self.assertIn("KeepAlive", plist)
            self.assertIn("StandardErrorPath", plist)


class DataPipelineLocal:
    """datapipeline-local on 127.0.0.1:0, started by the host for the journey."""

    def __init__(self, workdir):
        self.creds = {"access-id": "AKIDJOURNEYTEST00001", "private-key": "journey-secret-key-0123456789"}
        path = os.path.join(workdir, "dp-credentials.json")
        with open(path, "w") as f:
            json.dump(self.creds, f)
        env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")}
        env["NO_PROXY"] = "*"
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, "target", "release", "datapipeline-local"), "serve", "--listen", "127.0.0.1:0",
             "--credentials", path], stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "dp.log"), "w"),
            text=True, start_new_session=True, env=env)
        self.url = None
        line = self.proc.stdout.readline()  # ends when the process exits or prints its first line
        m = re.search(r"listening on (http://\S+)", line or "")
        if m:
            self.url = m.group(1)

    def client(self):
        import boto3  # the journey's remote checks use a client this project did not write

        os.environ["NO_PROXY"] = "*"
        return boto3.client("datapipeline", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.creds["access-id"],
                            aws_secret_access_key=self.creds["private-key"])

    def submit(self, name, worker_group, command):
        c = self.client()
        pid = c.create_pipeline(name=name, uniqueId=name)["pipelineId"]
        objects = [
            {"id": "Default", "name": "Default", "fields": [
                {"key": "scheduleType", "stringValue": "ondemand"},
                {"key": "failureAndRerunMode", "stringValue": "CASCADE"},
                {"key": "role", "stringValue": "DataPipelineDefaultRole"},
                {"key": "resourceRole", "stringValue": "DataPipelineDefaultResourceRole"}]},
            {"id": "CreateDirectory", "name": "CreateDirectory", "fields": [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "command", "stringValue": command},
                {"key": "workerGroup", "stringValue": worker_group}]},
        ]
        r = c.put_pipeline_definition(pipelineId=pid, pipelineObjects=objects)
        if r.get("errored"):
            raise AssertionError(f"PutPipelineDefinition: {r}")
        c.activate_pipeline(pipelineId=pid)
        return pid

    def attempt_states(self, pipeline_id):
        c = self.client()
        ids = c.query_objects(pipelineId=pipeline_id, sphere="ATTEMPT").get("ids", [])
        if not ids:
            return []
        objs = c.describe_objects(pipelineId=pipeline_id, objectIds=ids)["pipelineObjects"]
        return [f.get("stringValue") for o in objs for f in o["fields"] if f["key"] == "@status"]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


JOURNEY_STEPS = [
    "install_deb", "user_created", "config_conffile", "no_instance_enabled", "man_page", "unit_verify",
    "endpoint_available", "enable_now", "active_after_ready", "status_text", "status_shows_status", "ctl_status",
    "ctl_status_json", "credentials_root_only", "task_in_journal", "journal_task_id", "journal_no_duplicates",
    "reload", "runs_as_taskrunner", "no_capabilities", "kill_restarts", "stop_drains", "purge",
    "purge_removed_user", "purge_removed_state", "apt_repo_refused_unsigned", "apt_repo_update",
    "apt_repo_install", "apt_repo_installed", "apt_repo_purge",
]


class T6Journey(unittest.TestCase):
    """The user's journey in a booted Debian container (tests/packaging/journey/journey.sh)."""

    results = None
    setup_error = None

    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="taskrunner-journey-")
        cls.dp = None
        cls.pipelines = {}
        try:
            cls._boot()
        except Exception as e:  # reported by every step instead of one setUpClass error
            cls.setup_error = f"{type(e).__name__}: {e}"

    @classmethod
    def _boot(cls):
        deb = deb_path()
        repo = AptRepo.build()
        root = debian_root()
        cls.dp = DataPipelineLocal(cls.work)
        endpoint = ""
        if cls.dp.url:
            endpoint = cls.dp.url
            cls.pipelines["main"] = cls.dp.submit("journey-main", "wg-12345",
                                                  "mkdir -p journey-created && test -d journey-created")
            cls.pipelines["drain"] = cls.dp.submit("journey-drain", "wg-drain", "sleep 8")
        results = os.path.join(cls.work, "results")
        os.makedirs(results)
        with open(os.path.join(results, "env"), "w") as f:
            f.write(f"ENDPOINT='{endpoint}'\nACCESS_ID='{cls.dp.creds['access-id']}'\n"
                    f"SECRET_KEY='{cls.dp.creds['private-key']}'\nDEB='{os.path.basename(deb)}'\nREPO=1\n")
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", root, "--ephemeral", "-b",
               "--console=pipe", f"--bind-ro={os.path.dirname(deb)}:/pkg", f"--bind-ro={repo}:/repo",
               f"--bind-ro={os.path.join(HERE, 'journey')}:/opt/journey",
               f"--bind-ro={os.path.join(HERE, 'journey', 'taskrunner-journey.service')}"
               ":/etc/systemd/system/taskrunner-journey.service",
               f"--bind={results}:/results", "systemd.wants=taskrunner-journey.service"]
        t0 = time.monotonic()
        with open(os.path.join(cls.work, "console.log"), "w") as console:
            p = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            try:
                p.wait(JOURNEY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)  # nspawn halts the container
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        TIMINGS["journey (boot to power-off)"] = time.monotonic() - t0
        cls.results = {}
        path = os.path.join(results, "journey.txt")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    word, _, rest = line.rstrip("\n").partition(" ")
                    if word in ("PASS", "FAIL"):
                        name, _, why = rest.partition(": ")
                        cls.results[name] = (word, why)
        # Kept for a look after the run: the journey's own output and its step results.
        for name in ("journey.log", "journey.txt"):
            if os.path.exists(os.path.join(results, name)):
                shutil.copy(os.path.join(results, name), os.path.join(ROOT, "target", name))

    @classmethod
    def tearDownClass(cls):
        if cls.dp:
            cls.dp.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def step(self, name):
        if self.setup_error:
            self.fail(f"journey not run: {self.setup_error}")
        word, why = self.results.get(name, ("FAIL", "step not reached (see target/journey.log, target/journey.txt)"))
        self.assertEqual(word, "PASS", why)

    def test_remote_attempts_finished(self):
        if self.setup_error:
            self.fail(f"journey not run: {self.setup_error}")
        if not self.dp or not self.dp.url:
            self.fail("datapipeline-local did not start (no `listening on URL` line)")
        for name in ("main", "drain"):
            self.assertIn("FINISHED", self.dp.attempt_states(self.pipelines[name]), f"{name} pipeline's attempt")


for _name in JOURNEY_STEPS:
    setattr(T6Journey, f"test_{_name}", lambda self, n=_name: self.step(n))


class Result(unittest.TextTestResult):
    pass


def main():
    if os.geteuid() != 0:
        print("the packaging tests need root (debootstrap, systemd-nspawn, rpm --root)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    if len(sys.argv) > 1:
        suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[1:], sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2, resultclass=Result).run(suite)
    TIMINGS["total"] = time.monotonic() - t0
    for k, v in TIMINGS.items():
        print(f"time {k}: {v:.1f} s")
    failed = len(result.failures) + len(result.errors)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f"packaging: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
