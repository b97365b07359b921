# The guest kernel booted with what guestwatch needs: its modules loaded, BTF, the debug,
# tracing and BPF file systems, and /dev/vsock.
for module in $GW_MODULES; do
    [ -d "/sys/module/$module" ] || gw_fail "module $module is not loaded (see insmod errors above)"
done
[ -s /sys/kernel/btf/vmlinux ] || gw_fail "no /sys/kernel/btf/vmlinux: the guest kernel has no BTF"
for fs in debugfs tracefs bpf; do
    grep -q " $fs " /proc/mounts || gw_fail "$fs is not mounted"
done
[ -c /dev/vsock ] || gw_fail "no /dev/vsock: the vsock modules did not register"
modules=$(echo $GW_MODULES | wc -w)
gw_note "kernel $(uname -r), $modules modules, BTF $(wc -c < /sys/kernel/btf/vmlinux) bytes"
