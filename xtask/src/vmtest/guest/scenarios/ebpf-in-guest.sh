# guestwatch-agent's BPF object loads in the guest's own kernel and its rpmtsRun uprobes fire
# for a real rpm transaction.
db=/var/lib/gw/ebpf-in-guest/rpm
gw_rpmdb "$db"
guestwatch-agent watch --dbpath "$db" > "$GW_LOGS/events.out" 2> "$GW_LOGS/agent.log" &
echo $! >> "$GW_LOGS/pids"

# Attached once the agent says so (log) or reports its detector (JSON event).
gw_until 60 grep -qE 'attached|"detector"' "$GW_LOGS/agent.log" "$GW_LOGS/events.out" \
    || gw_fail "the agent did not attach its probes within 60s"
grep -qi 'without eBPF\|inotify' "$GW_LOGS/agent.log" && gw_fail "the agent fell back from eBPF"

start=$(gw_now)
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-ebpf.rpm \
    || gw_fail "rpm -i failed"
rpm --dbpath "$db" -q gw-vmtest-ebpf > /dev/null || gw_fail "rpm -q does not see the package"
gw_until 30 grep -q '"comm": *"rpm"' "$GW_LOGS/events.out" \
    || gw_fail "no rpmtsRun event from comm rpm within 30s of rpm -i"
seen=$(( ($(gw_now) - start) * 10 ))
library=$(grep -o 'attached to [^ ]* in [^ ]*' "$GW_LOGS/agent.log" | head -n 1 | sed 's/.* in //')
gw_note "rpmtsRun event for rpm -i ${seen} ms after it started (guest clock), probe on ${library:-librpm}"
