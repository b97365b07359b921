# guestwatch-relay's own AF_VSOCK listener, inside the guest: the agent connects to the
# guest's own CID, which the kernel routes through the vsock_loopback transport. Such
# connections come from CID 1 (VMADDR_CID_LOCAL), whatever CID was dialled, which the relay
# only accepts with --allow-loopback-cid.
db=/var/lib/gw/loopback-relay/rpm
sink=/var/lib/gw/loopback-relay/sink
gw_rpmdb "$db" gw-vmtest-loopback
gw_bg relay guestwatch-relay run --vsock-port "$GW_LOOPBACK_RELAY_PORT" --allow-loopback-cid --sink "dir:$sink"
gw_bg agent guestwatch-agent run --dbpath "$db" --relay "vsock:$GW_GUEST_CID:$GW_LOOPBACK_RELAY_PORT" \
    --state /var/lib/gw/loopback-relay/state
start=$(gw_now)
delivered() { grep -ql gw-vmtest-loopback "$sink"/vms/*/latest.json 2> /dev/null; }
refused() { grep -q 'CID 1 is reserved' "$GW_LOGS/relay.log"; }
settled() { delivered || refused; }
gw_until 90 settled
delivered || {
    refused && gw_fail "the relay refuses vsock_loopback peers (they come from CID 1, which it rejects as reserved)"
    gw_fail "no report naming gw-vmtest-loopback in $sink/vms/*/latest.json within 90s"
}
gw_note "delivered inside the guest as VM '$(ls "$sink/vms" | head -n 1)' $(( ($(gw_now) - start) * 10 )) ms after start"
