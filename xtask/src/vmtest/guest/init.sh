#!/usr/bin/busybox sh
# PID 1 of the vm-test guest: mount the kernel file systems, load the modules, start the
# control-channel reader, run the scenarios in order, power off. Never `exit`: PID 1 exiting
# panics the kernel (which, with panic=-1 and -no-reboot, does at least stop QEMU).

export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin
export HOME=/root
. /gw/config.sh
. /gw/lib.sh

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/gw /var/tmp
hostname guestwatch-vm

for module in $GW_MODULES; do
    insmod "/gw/modules/$module.ko" || echo "vm-test: insmod $module failed"
done

# Host → guest: the host writes `<scenario>:<word>` lines to the second serial port. One
# reader keeps the port open for the whole run (an 8250 drops its FIFO when reopened) and
# appends to a file every scenario can poll.
(
    exec < /dev/ttyS1
    stty raw -echo
    : > /run/gw/control-ready
    exec cat
) > /run/gw/control 2> /run/gw/control.err &
gw_until 10 test -e /run/gw/control-ready || echo "vm-test: the control channel reader did not start"

gw_mark init "$(cut -d' ' -f1 /proc/uptime)"
for scenario in $GW_SCENARIOS; do
    gw_run "$scenario"
done
gw_mark done

if [ "$GW_KEEP" = 1 ]; then
    echo "vm-test: scenarios done; this shell is the guest's console (logs in /run/gw)."
    echo "vm-test: \`exit\` or \`poweroff -f\` stops the guest."
    setsid cttyhack sh
fi
poweroff -f
