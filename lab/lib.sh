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

# now: level 1's uptime in seconds (two decimals).
now() { cut -d' ' -f1 /proc/uptime; }

# since START: seconds from START (a `now` value) to now.
since() { awk "BEGIN{printf \"%.2f\", $(now) - $1}"; }

# show_tail FILE [LINES]: the end of a log, for a failure's context.
show_tail() {
  [ -f "$1" ] || return 0
  echo "lab: --- last ${2:-40} lines of $1 ---"
  tail -n "${2:-40}" "$1"
  echo "lab: --- end of $1 ---"
}

# json_field JSON NAME: the value of a top-level string or number field
# (enough for the flat answers forkd-agent-cli and forkd-vmm ctl print).
json_field() {
  printf '%s\n' "$1" | sed -n "s/.*\"$2\":\(\"\([^\"\\\\]\|\\\\.\)*\"\|[^,}]*\).*/\1/p" | sed 's/^"\(.*\)"$/\1/'
}
