# The relay reloads its CID map while it runs: agent and relay in the guest (the relay's own
# AF_VSOCK listener through vsock_loopback, where every peer is CID 1), the map names CID 1
# `guest-a`; rewritten (rename into place) to name it `guest-b`, the relay closes guest-a's
# connection and counts it, the agent reconnects, and its next report is delivered as
# guest-b — without a relay restart.
base=/var/lib/gw/cid-map-reload
db=$base/rpm
sink=$base/sink
map=$base/cids
mkdir -p "$base"
echo "1 guest-a" > "$map"
gw_rpmdb "$db" gw-vmtest-loopback
gw_bg relay guestwatch-relay run --vsock-port "$GW_LOOPBACK_RELAY_PORT" --allow-loopback-cid \
    --cid-map "$map" --sink "dir:$sink"
gw_bg agent guestwatch-agent run --dbpath "$db" \
    --relay "vsock:$GW_GUEST_CID:$GW_LOOPBACK_RELAY_PORT" --state "$base/state"
gw_until 90 test -e "$sink/vms/guest-a/latest.json" \
    || gw_fail "no first report as guest-a within 90s"
echo "1 guest-b" > "$map.new" && mv "$map.new" "$map"
start=$(gw_now)
gw_until 30 grep -q "the CID map no longer names guest-a" "$GW_LOGS/relay.log" \
    || gw_fail "the relay did not apply the new CID map within 30s"
applied=$(( ($(gw_now) - start) * 10 ))
rpm --dbpath "$db" -i --justdb --nodeps --nosignature /gw/pkgs/gw-vmtest-renamed.rpm \
    || gw_fail "rpm -i gw-vmtest-renamed failed"
gw_until 60 grep -q gw-vmtest-renamed "$sink/vms/guest-b/latest.json" 2> /dev/null \
    || gw_fail "the change was not delivered as guest-b within 60s"
grep -q "reload (a file changed): CID map applied" "$GW_LOGS/relay.log" \
    || gw_fail "the relay did not say it applied the map"
gw_note "new map applied ${applied} ms after the rename, guest-a's connection closed, the next report delivered as guest-b"
