#!/bin/sh
# forkd-vmm boots our kernel with the Debian ext4 rootfs on virtio-blk (root=/dev/vda); its default init runs python3 and numpy, then reboots
# needs: kernel rootfs

log=$LAB_TMP/console.log
step "forkd-vmm run --kernel vmlinux --drive rootfs.ext4,cow=<layer on tmpfs> --rng --mem-mib 512"
start=$(cut -d' ' -f1 /proc/uptime)
{ timeout 600 "$LAB_VMM" run --kernel "$LAB_IMAGES/vmlinux" \
    --drive "$LAB_IMAGES/rootfs.ext4,cow=$LAB_TMP/rootfs.cow" \
    --cmdline "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4" \
    --rng --mem-mib 512 --vcpus 1 --console stdout 2>&1
  echo $? >"$LAB_TMP/rc"; } | tee "$log"
rc=$(cat "$LAB_TMP/rc")
end=$(cut -d' ' -f1 /proc/uptime)
step "forkd-vmm exited with status $rc after $(awk "BEGIN{print $end - $start}") s"
if grep -q "Kernel panic" "$log"; then
  fail "the level-2 kernel panicked: $(grep -m1 'Kernel panic' "$log")"
fi
expect_line "$log" "^FORKD-ROOTFS: init up" "the rootfs's /sbin/init did not run"
expect_line "$log" "root /dev/vda (ext4)" "the root filesystem is not the ext4 on /dev/vda"
expect_line "$log" "numpy.zeros(5).sum() = 0.0" "python3 with numpy did not run in the guest"
[ "$rc" = 0 ] || fail "forkd-vmm exited with status $rc (124: timed out), not 0, after the guest rebooted"
