# The host relay is stopped while the guest changes packages; the agent keeps the report and
# delivers it once the relay is back.
db=/var/lib/gw/relay-restart/rpm
gw_rpmdb "$db" gw-vmtest-base
gw_bg agent guestwatch-agent run --dbpath "$db" --relay "vsock:2:$GW_RELAY_PORT" \
    --state /var/lib/gw/relay-restart/state
gw_signal agent-started
gw_wait first-delivered 90
gw_signal stop-relay
gw_wait relay-stopped 30
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-while-down.rpm \
    || gw_fail "rpm -i failed"
gw_signal installed-while-down
gw_wait delivered-after-restart 150
