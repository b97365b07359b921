# `rpm -i` in the guest is detected by eBPF in the guest kernel, attributed, and delivered to
# the host relay's sink; the host measures guest-change-to-host-sink latency.
db=/var/lib/gw/rpm-delivered/rpm
gw_rpmdb "$db" gw-vmtest-base
gw_bg agent guestwatch-agent run --dbpath "$db" --relay "vsock:2:$GW_RELAY_PORT" \
    --state /var/lib/gw/rpm-delivered/state
gw_signal agent-started
gw_wait first-delivered 90
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-new.rpm \
    || gw_fail "rpm -i failed"
gw_signal installed
gw_wait delivered 60
