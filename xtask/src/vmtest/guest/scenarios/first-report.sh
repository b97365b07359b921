# guestwatch-agent in the guest delivers its first report over AF_VSOCK to the relay on the
# host, which writes it to its dir: sink.
db=/var/lib/gw/first-report/rpm
gw_rpmdb "$db" gw-vmtest-base
gw_signal agent-starting
gw_bg agent guestwatch-agent run --dbpath "$db" --relay "vsock:2:$GW_RELAY_PORT" \
    --state /var/lib/gw/first-report/state
gw_wait delivered 90
