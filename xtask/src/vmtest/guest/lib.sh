# Helpers for the vm-test guest (busybox sh), sourced by /init and by every scenario script.
#
# Guest → host: marker lines on the console, `@@gw <event> …`, parsed by console.rs:
#   init UPTIME | begin NAME | note NAME TEXT | signal NAME WORD | end NAME RC | done
# Host → guest: `NAME:WORD` lines appended to /run/gw/control (see init.sh).

gw_mark() { echo "@@gw $*"; }

# Debian's static busybox runs its own applets before searching PATH, and it has an `rpm`
# applet: the real rpm must be called by path.
rpm() { /usr/bin/rpm "$@"; }

# A detail for the scenario's result line.
gw_note() { gw_mark note "$GW_SCENARIO" "$*"; }

# Tells the host something happened; its scenario code answers with gw_wait words.
gw_signal() { gw_mark signal "$GW_SCENARIO" "$1"; }

# Ends the scenario as failed, with the reason on its result line.
gw_fail() {
    gw_note "FAIL: $*"
    exit 1
}

# Centiseconds since boot (/proc/uptime has exactly two decimals).
gw_now() {
    read -r up _ < /proc/uptime
    echo $(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

# gw_await WORD SECONDS: waits for the host's `$GW_SCENARIO:WORD`.
# Returns 0 when it came, 2 when the host aborted the scenario, 1 on timeout.
gw_await() {
    deadline=$(( $(gw_now) + $2 * 100 ))
    while :; do
        grep -qx "$GW_SCENARIO:$1" /run/gw/control && return 0
        grep -qx "$GW_SCENARIO:abort" /run/gw/control && return 2
        [ "$(gw_now)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

# gw_wait WORD [SECONDS]: like gw_await, but fails the scenario unless the word came.
gw_wait() {
    gw_await "$1" "${2:-120}"
    case $? in
    0) return 0 ;;
    2) gw_fail "the host aborted while the guest waited for '$1' (see the host's reason)" ;;
    *) gw_fail "no '$1' from the host within ${2:-120}s" ;;
    esac
}

# gw_until SECONDS COMMAND…: reruns COMMAND every 50 ms until it succeeds; 1 on timeout.
gw_until() {
    secs=$1
    shift
    deadline=$(( $(gw_now) + secs * 100 ))
    until "$@"; do
        [ "$(gw_now)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

# gw_bg NAME COMMAND…: runs COMMAND in the background, output in $GW_LOGS/NAME.log; it is
# killed (by PID) when the scenario ends.
gw_bg() {
    name=$1
    shift
    "$@" > "$GW_LOGS/$name.log" 2>&1 &
    echo $! >> "$GW_LOGS/pids"
}

# gw_rpmdb DIR PACKAGE…: a fresh rpm database holding the named /gw/pkgs packages.
gw_rpmdb() {
    db=$1
    shift
    mkdir -p "$db" && rpm --dbpath "$db" --initdb || gw_fail "rpm --initdb $db failed"
    for package in "$@"; do
        rpm --dbpath "$db" -i --justdb --nodeps --nosignature "/gw/pkgs/$package.rpm" \
            || gw_fail "rpm -i $package failed"
    done
}

# gw_run NAME (init only): one scenario, in lockstep with the host: begin, the script under
# a timeout, then cleanup and end.
gw_run() {
    GW_SCENARIO=$1
    GW_LOGS=/run/gw/$1
    export GW_SCENARIO GW_LOGS
    mkdir -p "$GW_LOGS"
    : > "$GW_LOGS/pids"
    gw_mark begin "$1"
    gw_await begin 120
    case $? in
    0)
        timeout -s KILL "$(cat "/gw/scenarios/$1.timeout")" sh "/gw/scenarios/$1.sh"
        rc=$?
        ;;
    2) rc=125 ;; # the host could not prepare its side
    *) rc=124 ;;
    esac
    for pid in $(cat "$GW_LOGS/pids"); do
        kill -9 "$pid" 2> /dev/null
    done
    if [ "$rc" != 0 ]; then
        for log in "$GW_LOGS"/*.log; do
            [ -e "$log" ] || continue
            echo "---- guest $log (last 30 lines)"
            tail -n 30 "$log"
        done
    fi
    gw_mark end "$1" "$rc"
    gw_await end 120 || echo "vm-test: no end acknowledgement from the host for $1"
}
