# Pull mode on a real guest kernel: the agent listens on AF_VSOCK (--listen vsock:PORT) and the
# host relay dials it through vhost-device-vsock's Unix socket (`CONNECT PORT` / `OK`), which
# the guest sees as a connection from the host, CID 2. A local process reaching the port
# through vsock_loopback comes from CID 1 and is refused. A change made in the guest reaches
# the host sink on the session the relay opened.
db=/var/lib/gw/pull-hybrid/rpm
gw_rpmdb "$db" gw-vmtest-base
gw_bg agent guestwatch-agent run --dbpath "$db" --listen "vsock:$GW_PULL_PORT" \
    --state /var/lib/gw/pull-hybrid/state
gw_until 60 grep -q "listening for the relay on vsock:$GW_PULL_PORT" "$GW_LOGS/agent.log" \
    || gw_fail "the agent did not listen on vsock:$GW_PULL_PORT within 60s"
gw_signal agent-listening
gw_wait first-delivered 90
grep -q "the relay connected" "$GW_LOGS/agent.log" || gw_fail "the agent logged no relay session"

# Not the host: refused (and counted), whatever it sends.
echo hello | socat -u - "VSOCK-CONNECT:1:$GW_PULL_PORT" 2> "$GW_LOGS/socat.log"
gw_until 20 grep -q "refused a connection on vsock:$GW_PULL_PORT from CID 1" "$GW_LOGS/agent.log" \
    || gw_fail "a vsock_loopback connection (CID 1) was not refused"
gw_note "a local connection from CID 1 was refused"

gw_signal installing
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-pulled.rpm \
    || gw_fail "rpm -i gw-vmtest-pulled failed"
gw_wait delivered 60
sessions=$(grep -c "the relay connected" "$GW_LOGS/agent.log")
gw_note "$sessions relay session(s) in the guest"
