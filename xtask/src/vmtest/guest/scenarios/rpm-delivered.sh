# `rpm -i` in the guest is detected by eBPF in the guest kernel, attributed, and delivered to
# the host relay's sink. The host times each change from the moment rpm starts (the guest
# signals just before) to the report naming the package at the sink.
db=/var/lib/gw/rpm-delivered/rpm
gw_rpmdb "$db" gw-vmtest-base
gw_bg agent guestwatch-agent run --dbpath "$db" --relay "vsock:2:$GW_RELAY_PORT" \
    --state /var/lib/gw/rpm-delivered/state
gw_signal agent-started
gw_wait first-delivered 90
for i in 1 2 3; do
    gw_signal "installing-$i"
    start=$(gw_now)
    rpm --dbpath "$db" -i --justdb --nodeps --nosignature "/gw/pkgs/gw-vmtest-new-$i.rpm" \
        || gw_fail "rpm -i gw-vmtest-new-$i failed"
    took="$took $(( ($(gw_now) - start) * 10 ))"
    gw_wait "delivered-$i" 60
done
gw_note "rpm -i itself took$took ms in the guest"
