# Bytes the guest sends over AF_VSOCK to host CID 2 arrive on the host's `<uds>_PORT` Unix
# listener (the hybrid-vsock path the relay listens on), and the vsock_loopback transport
# works inside the guest (what the in-guest relay scenario needs).
seq 1 20000 | socat -u - "VSOCK-CONNECT:2:$GW_PROBE_PORT" 2> "$GW_LOGS/socat-host.log" \
    || gw_fail "socat could not send to CID 2 port $GW_PROBE_PORT: $(tail -n 1 "$GW_LOGS/socat-host.log")"
gw_signal sent
gw_wait received 30

[ -d /sys/module/vsock_loopback ] || gw_fail "vsock_loopback is not loaded"
for cid in 1 3; do
    out="$GW_LOGS/loopback-$cid.out"
    gw_bg "listen-$cid" socat -d -d -u "VSOCK-LISTEN:$GW_LOOPBACK_PORT" "CREATE:$out"
    gw_until 10 sh -c "echo loopback-$cid | socat -u - VSOCK-CONNECT:$cid:$GW_LOOPBACK_PORT" \
        || gw_fail "could not connect to CID $cid port $GW_LOOPBACK_PORT inside the guest"
    gw_until 10 grep -qx "loopback-$cid" "$out" || gw_fail "loopback to CID $cid lost the bytes"
    # Which peer CID a listener sees for loopback connections matters to the relay's identity.
    peer=$(grep -o 'accepting connection from AF=40 cid:[0-9]*' "$GW_LOGS/listen-$cid.log" \
        | head -n 1 | sed 's/.*cid://')
    gw_note "in-guest loopback to CID $cid works (listener sees peer CID ${peer:-?})"
done
