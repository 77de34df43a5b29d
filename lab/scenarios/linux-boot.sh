#!/bin/sh
# forkd-vmm boots our kernel (vmlinux, then bzImage; 2 vCPUs) with a busybox initramfs to its init, which reboots: forkd-vmm exits 0
# needs: kernel initrd

boot() { # boot KERNEL_FILE: run one level-2 guest, console to the screen and a file
  kernel=$1
  log=$LAB_TMP/console-$kernel.log
  step "forkd-vmm run --kernel $kernel --initrd initrd.cpio.gz --vcpus 2 --mem-mib 256"
  start=$(cut -d' ' -f1 /proc/uptime)
  { timeout 300 "$LAB_VMM" run --kernel "$LAB_IMAGES/$kernel" --initrd "$LAB_IMAGES/initrd.cpio.gz" \
      --cmdline "console=ttyS0 reboot=k panic=-1 rdinit=/init" \
      --mem-mib 256 --vcpus 2 --console stdout 2>&1
    echo $? >"$LAB_TMP/rc"; } | tee "$log"
  rc=$(cat "$LAB_TMP/rc")
  end=$(cut -d' ' -f1 /proc/uptime)
  step "forkd-vmm exited with status $rc after $(awk "BEGIN{print $end - $start}") s"
  if grep -q "Kernel panic" "$log"; then
    fail "$kernel: the level-2 kernel panicked: $(grep -m1 'Kernel panic' "$log")"
  fi
  expect_line "$log" "^FORKD-L2: init up" "$kernel: the level-2 guest did not reach its init"
  grep -q "cpus 2," "$log" || fail "$kernel: the level-2 guest does not see 2 CPUs: $(grep '^FORKD-L2: init' "$log")"
  [ "$rc" = 0 ] || fail "$kernel: forkd-vmm exited with status $rc (124: timed out), not 0, after the guest rebooted"
}

boot vmlinux
boot bzImage
