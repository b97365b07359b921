# The fallback on a real kernel: the agent is started without CAP_BPF, CAP_PERFMON and
# CAP_SYS_ADMIN (util-linux setpriv drops them from the bounding and inheritable sets, so
# root's exec does not get them back), the guest kernel refuses its BPF programs, and the
# agent falls back to inotify on its own, says why once, and still delivers a change made
# in the guest to the host sink.
db=/var/lib/gw/bpf-refused/rpm
gw_rpmdb "$db" gw-vmtest-base
drop=-bpf,-perfmon,-sys_admin
# By path: the static busybox would run its own setpriv applet, which has no --bounding-set.
gw_bg agent /usr/bin/setpriv --inh-caps="$drop" --bounding-set="$drop" \
    /usr/local/bin/guestwatch-agent run --dbpath "$db" --relay "vsock:2:$GW_RELAY_PORT" \
    --state /var/lib/gw/bpf-refused/state
gw_signal agent-started
gw_wait first-delivered 90
log=$GW_LOGS/agent.log
grep -q "detector: inotify" "$log" || gw_fail "the agent is not in inotify mode: $(grep detector "$log" | head -c 300)"
said=$(grep -c "eBPF unavailable" "$log")
[ "$said" = 1 ] || gw_fail "the agent said why $said times, not once"
why=$(grep -o "eBPF unavailable: .*" "$log" | head -n 1 | cut -c 1-160)
gw_note "$why"
gw_signal installing
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-nobpf.rpm \
    || gw_fail "rpm -i gw-vmtest-nobpf failed"
gw_wait delivered 60
said=$(grep -c "eBPF unavailable" "$log")
[ "$said" = 1 ] || gw_fail "the agent said why $said times by the end, not once"
