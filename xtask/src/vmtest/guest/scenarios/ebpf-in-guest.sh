# guestwatch-agent's BPF object loads in the guest's own kernel and its rpmtsRun uprobes fire
# for a real rpm transaction.
db=/var/lib/gw/ebpf-in-guest/rpm
events=$GW_LOGS/events.out
gw_rpmdb "$db"
guestwatch-agent watch --dbpath "$db" > "$events" 2> "$GW_LOGS/agent.log" &
echo $! >> "$GW_LOGS/pids"

# Ready once it reports its detector (a `detector` JSON line) or logs the attachment.
gw_until 60 grep -qE '"event": *"detector"|attached to rpmtsRun' "$events" "$GW_LOGS/agent.log" \
    || gw_fail "the agent did not start detecting within 60s"
if grep -q '"event": *"detector"' "$events"; then
    grep '"event": *"detector"' "$events" | grep -q '"mode": *"ebpf"' \
        || gw_fail "the agent is not in eBPF mode: $(grep '"detector"' "$events" | head -c 400)"
fi

start=$(gw_now)
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-ebpf.rpm \
    || gw_fail "rpm -i failed"
rpm --dbpath "$db" -q gw-vmtest-ebpf > /dev/null || gw_fail "rpm -q does not see the package"
gw_until 30 grep -q '"comm": *"rpm"' "$events" \
    || gw_fail "no rpmtsRun event from comm rpm within 30s of rpm -i"
seen=$(( ($(gw_now) - start) * 10 ))
library=$( (grep -o 'attached to rpmtsRun in [^ ]*' "$GW_LOGS/agent.log" | sed 's/.* in //'
    grep -o '"libraries": *\["[^"]*' "$events" | sed 's/.*"//') | head -n 1)
gw_note "rpmtsRun event for rpm -i ${seen} ms after it started (guest clock), probe on ${library:-librpm}"
