#!/bin/bash
# The user's journey, inside a booted Debian container (tests/packaging/run.py starts it). Each step
# writes `PASS name` or `FAIL name: why` to /results/journey.txt; the host test reads that file
# after power-off and checks the remote side (task states) itself.
#
# /results/env (written by the host): ENDPOINT (datapipeline-local's URL, empty when it could not
# be started), ACCESS_ID, SECRET_KEY, DEB (file name under /pkg), REPO (1 when /repo holds the
# signed apt repository).
set -u
R=/results/journey.txt
: >"$R"
# shellcheck disable=SC1091
. /results/env
export SYSTEMD_PAGER= SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive

pass() { echo "PASS $1" >>"$R"; }
fail() { echo "FAIL $1: $(printf '%s' "$2" | tail -n 4 | tr '\n' ' ' | cut -c1-400)" >>"$R"; }
# check NAME CMD...: PASS when CMD exits 0.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}
# wait_for SECONDS CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
    local end=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.5
    done
}
main_pid() { systemctl show -p MainPID --value "$1"; }
active() { [ "$(systemctl is-active "$1")" = active ]; }

I=taskrunner@wg-12345.service
D=taskrunner@wg-drain.service

# --- apt install ./taskrunner_*.deb -------------------------------------------------------------
check install_deb apt-get install -y -q "/pkg/$DEB"
check user_created sh -c 'getent passwd taskrunner | grep -q ":/var/lib/taskrunner:/usr/sbin/nologin$"'
check config_conffile sh -c 'dpkg-query -W -f="\${Conffiles}" taskrunner | grep -q "/etc/taskrunner/config.toml"'
check no_instance_enabled sh -c '! ls /etc/systemd/system/*.wants/taskrunner@* 2>/dev/null && [ -z "$(systemctl list-units --all --no-legend "taskrunner@*")" ]'
check man_page test -s /usr/share/man/man8/taskrunner.8.gz
check unit_verify sh -c 'out=$(systemd-analyze verify --man=no taskrunner@wg-12345.service 2>&1); [ -z "$out" ] || { echo "$out"; false; }'

# --- first start of an instance -----------------------------------------------------------------
printf '{"access-id": "%s", "private-key": "%s"}\n' "$ACCESS_ID" "$SECRET_KEY" >/etc/taskrunner/credentials.json
chmod 0600 /etc/taskrunner/credentials.json
# The test's endpoint and region, as an operator's drop-in would set them (flags of the jar).
mkdir -p /etc/systemd/system/taskrunner@.service.d
cat >/etc/systemd/system/taskrunner@.service.d/journey-endpoint.conf <<CONF
[Service]
ExecStart=
ExecStart=/usr/bin/taskrunner --workerGroup=%i --instance=%i --settings=/etc/taskrunner/config.toml --endpoint=$ENDPOINT --region=us-east-1
CONF
systemctl daemon-reload

check endpoint_available test -n "$ENDPOINT"
check enable_now timeout 90 systemctl enable --now "$I"
# Type=notify: `systemctl enable --now` returns once READY=1 came; active only then.
check active_after_ready sh -c "[ \"\$(systemctl show -p Type --value $I)\" = notify ] && [ \"\$(systemctl is-active $I)\" = active ]"
check status_text sh -c "systemctl show -p StatusText --value $I | grep -q ."
check status_shows_status sh -c "systemctl status --no-pager $I | grep -q 'Status: \"'"
check ctl_status sh -c 'out=$(taskrunner-ctl status wg-12345) && echo "$out" | grep -q wg-12345'
check ctl_status_json sh -c 'taskrunner-ctl status wg-12345 --json | grep -q "{"'
check credentials_root_only sh -c '[ "$(stat -c %a:%U /etc/taskrunner/credentials.json)" = 600:root ]'

# The CreateDirectory task (submitted by the host before boot) is handed out and run; its
# entries carry TASK_ID= in the journal.
task_logged() { journalctl -u "$I" -o export | grep -q '^TASK_ID='; }
if ! active "$I"; then
    fail task_in_journal "$I is not active"
elif wait_for 90 task_logged; then
    tid=$(journalctl -u "$I" -o export | sed -n 's/^TASK_ID=//p' | head -n1)
    pass task_in_journal
    echo "TASK_ID $tid" >>"$R"
    check journal_task_id sh -c "journalctl -u $I TASK_ID=$tid -o cat | grep -q ."
    # Each line once: the daemon must not log to stdout and the journal at the same time. (Two tasks
    # legitimately log the same message text, so check the lines a start prints exactly once.)
    check journal_no_duplicates sh -c "[ \"\$(journalctl -u $I -o cat | grep -c 'Logging to ')\" = 1 ] && [ \"\$(journalctl -u $I -o cat | grep -c 'taskrunner .* starting')\" = 1 ]"
else
    fail task_in_journal "no journal entry with TASK_ID= within 90 s"
fi

pid=$(main_pid "$I")
check reload sh -c "systemctl reload $I && sleep 1 && [ \"\$(systemctl is-active $I)\" = active ] && [ \"\$(systemctl show -p MainPID --value $I)\" = $pid ]"

tr_uid=$(id -u taskrunner)
if [ "$pid" != 0 ] && [ -r "/proc/$pid/status" ]; then
    check runs_as_taskrunner sh -c "awk '/^Uid:/ {exit !(\$2==$tr_uid && \$3==$tr_uid && \$4==$tr_uid && \$5==$tr_uid)}' /proc/$pid/status"
    check no_capabilities sh -c "awk '/^Cap(Inh|Prm|Eff|Bnd|Amb):/ && \$2 != \"0000000000000000\" {bad=1} END {exit bad}' /proc/$pid/status"
else
    fail runs_as_taskrunner "no main process"
    fail no_capabilities "no main process"
fi

if [ "$pid" != 0 ]; then
    systemctl kill -s KILL "$I"
    restarted() { active "$I" && [ "$(main_pid "$I")" != "$pid" ] && [ "$(main_pid "$I")" != 0 ]; }
    if wait_for 45 restarted; then pass kill_restarts; else fail kill_restarts "not active again with a new pid within 45 s"; fi
else
    fail kill_restarts "no main process"
fi

# --- stop with a task running drains it ----------------------------------------------------------
# wg-drain's pipeline (host) runs a task that sleeps 8 s.
if timeout 90 systemctl start "$D" >/dev/null 2>&1; then
    drain_task() { journalctl -u "$D" -o export | grep -q '^TASK_ID='; }
    if wait_for 90 drain_task; then
        t0=$SECONDS
        systemctl stop "$D"
        took=$((SECONDS - t0))
        echo "DRAIN_STOP_SECONDS $took" >>"$R"
        check stop_drains sh -c "[ \"\$(systemctl show -p Result --value $D)\" = success ] && [ \"\$(systemctl show -p ExecMainStatus --value $D)\" = 0 ] && [ $took -ge 2 ]"
    else
        fail stop_drains "the wg-drain task never started"
    fi
else
    fail stop_drains "taskrunner@wg-drain did not start"
fi
systemctl disable --now "$I" >/dev/null 2>&1

# --- purge ---------------------------------------------------------------------------------------
rm -rf /etc/systemd/system/taskrunner@.service.d
check purge dpkg --purge taskrunner
check purge_removed_user sh -c '! getent passwd taskrunner && ! getent group taskrunner'
check purge_removed_state sh -c '[ ! -e /var/lib/taskrunner ] && [ ! -e /var/log/taskrunner ] && [ ! -e /etc/taskrunner ] && [ ! -e /lib/systemd/system/taskrunner@.service ]'

# --- apt-get install taskrunner from the signed repository ---------------------------------------
if [ "${REPO:-0}" = 1 ]; then
    list=/etc/apt/sources.list.d/taskrunner.list
    apt_only_ours() { apt-get -q -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- "$@"; }
    # Without the key the repository is refused.
    echo "deb file:///repo stable main" >"$list"
    if out=$(apt_only_ours update 2>&1) && ! echo "$out" | grep -q -E 'NO_PUBKEY|not signed|no longer signed'; then
        fail apt_repo_refused_unsigned "apt-get update accepted the repository without its key"
    else
        pass apt_repo_refused_unsigned
    fi
    install -d /etc/apt/keyrings
    cp /repo/taskrunner-archive-keyring.gpg /etc/apt/keyrings/taskrunner.gpg
    echo "deb [signed-by=/etc/apt/keyrings/taskrunner.gpg] file:///repo stable main" >"$list"
    check apt_repo_update sh -c "out=\$(apt-get -q -o Dir::Etc::sourcelist=$list -o Dir::Etc::sourceparts=- update 2>&1); echo \"\$out\"; ! echo \"\$out\" | grep -q -E '^(W|E):'"
    check apt_repo_install apt_only_ours install -y taskrunner
    check apt_repo_installed sh -c '[ "$(dpkg-query -W -f="\${Status}" taskrunner)" = "install ok installed" ] && test -x /usr/bin/taskrunner'
    check apt_repo_purge dpkg --purge taskrunner
fi
echo DONE >>"$R"
