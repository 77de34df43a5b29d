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

# lab_diagnose: level 1's state for a hang: memory, every process with its
# state and what it waits on (kernel stacks of forkd's threads), the end of
# the kernel log and of every log under /tmp.
lab_diagnose() {
  echo "lab: --- memory ---"
  grep -E '^(MemTotal|MemFree|MemAvailable|Shmem|AnonPages|Cached):' /proc/meminfo
  echo "lab: --- processes (pid state wchan command) ---"
  for d in /proc/[0-9]*; do
    [ -r "$d/stat" ] || continue
    printf '%s %s %s %s\n' "${d#/proc/}" "$(cut -d' ' -f3 "$d/stat" 2>/dev/null)" \
      "$(cat "$d/wchan" 2>/dev/null)" "$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null | cut -c1-160)"
  done
  for d in /proc/[0-9]*; do
    case "$(cat "$d/comm" 2>/dev/null)" in forkd*) ;; *) continue ;; esac
    for t in "$d"/task/*; do
      echo "lab: --- thread ${t##*/} of ${d#/proc/} ($(cat "$t/comm" 2>/dev/null), state $(cut -d' ' -f3 "$t/stat" 2>/dev/null)) ---"
      cat "$t/stack" 2>/dev/null | head -n 12
    done
  done
  echo "lab: --- kernel log ---"
  dmesg | tail -n 40
  find /tmp -name '*.log' -type f 2>/dev/null | while read -r f; do show_tail "$f" 30; done
}
