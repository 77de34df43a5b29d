# Helpers for lab scenarios, sourced in level 1 before the scenario
# (busybox sh). Environment: LAB_VMM (forkd-vmm), LAB_IMAGES (the data
# disk: vmlinux, bzImage, initrd.cpio.gz, rootfs.ext4 as the scenario's
# `# needs:` line asked), LAB_TMP (a tmpfs).
set -u

# fail REASON...: the scenario fails with this reason.
fail() {
  echo "$*" >/tmp/lab-fail-reason
  echo "lab: FAIL: $*"
  exit 1
}

# step TEXT: a progress line with level 1's uptime.
step() { echo "lab: [$(cut -d' ' -f1 /proc/uptime) s] $*"; }

# expect_line FILE PATTERN WHAT: fail unless FILE has a line matching PATTERN.
expect_line() {
  grep -q -- "$2" "$1" || fail "$3 (no line matching '$2' in the output)"
}
