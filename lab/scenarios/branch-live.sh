#!/bin/sh
# a Linux guest on memfd RAM appends a counter to a file on its disk; branch it mid-work live (then diff), fork 2 children from each branch: each continues the count from the branch point, gap-free, while the source runs on
# needs: kernel agent-rootfs
set -eu -o pipefail

N=2
live=$LAB_TMP/branch-live
diff=$LAB_TMP/branch-diff
console=$LAB_TMP/console.log
vmmlog=$LAB_TMP/vmm.log
ctl() { forkd-vmm ctl --control-socket "$1" "$2"; }
pcli() { forkd-agent-cli --vsock-uds "$LAB_TMP/vsock.sock" "$@"; }
# kcli KIDS I ARGS...: the agent of child I under KIDS.
kcli() { k=$1; i=$2; shift 2; forkd-agent-cli --vsock-uds "$k/$i/vsock.sock" "$@"; }
context() {
  show_tail "$console" 40
  show_tail "$vmmlog" 20
  for k in "$LAB_TMP"/kids-*; do
    [ -d "$k" ] || continue
    for i in $(seq 0 $((N - 1))); do
      show_tail "$k/$i/console.log" 30
      show_tail "$k/$i/vmm.log" 20
    done
  done
}
die_ctx() { context; fail "$@"; }

# The work: a process that appends "<n> <guest monotonic ns>" to a file on
# the rootfs disk every 5 ms, one write (flushed) per line. Gap-free counts
# show the state is consistent; the time stamps tell the source's lines
# after a branch from a child's (so the common prefix is the branch point).
COUNTER='import time
f = open("/root/count", "a")
n = 0
while True:
    n += 1
    f.write("%d %d\n" % (n, time.monotonic_ns()))
    f.flush()
    time.sleep(0.005)
'

# complete_lines: stdin without a last line that lacks its newline (a read
# may see the write of the last line half done).
complete_lines() {
  cat >"$LAB_TMP/lines.tmp"
  if [ -n "$(tail -c 1 "$LAB_TMP/lines.tmp")" ]; then sed '$d' "$LAB_TMP/lines.tmp"; else cat "$LAB_TMP/lines.tmp"; fi
}

# read_count CLI...: the guest's file, complete lines only.
read_count() {
  "$@" exec cat /root/count >"$LAB_TMP/read.tmp" || return 1
  complete_lines <"$LAB_TMP/read.tmp"
}

# last_count CLI...: the last count the guest has written.
last_count() {
  "$@" exec tail -n 2 /root/count >"$LAB_TMP/last.tmp" || return 1
  l=$(complete_lines <"$LAB_TMP/last.tmp" | tail -n 1)
  echo "${l%% *}"
}

# wait_count_above N SECS CLI...: waits until the guest's count passes N;
# prints the count.
wait_count_above() {
  above=$1 secs=$2
  shift 2
  t=$(now)
  while :; do
    n=$(last_count "$@" 2>/dev/null || true)
    if [ -n "$n" ] && [ "$n" -gt "$above" ]; then
      echo "$n"
      return 0
    fi
    [ "$(awk "BEGIN{print ($(now) - $t > $secs)}")" = 0 ] || { echo "${n:-none}"; return 1; }
    sleep 0.5
  done
}

# check_gapless FILE WHAT: FILE's counts are 1, 2, 3, ... without a gap or
# a torn line; prints the last.
check_gapless() {
  awk -v what="$2" '
    NF != 2 || $1 != NR || $2 !~ /^[0-9]+$/ { printf "%s: line %d is \"%s\" (expected the count %d and a time)\n", what, NR, $0, NR; bad = 1; exit 1 }
    END { if (!bad) { if (NR == 0) { printf "%s: no lines\n", what; exit 1 } print NR } }
  ' "$1"
}

# common_prefix A B: how many leading lines A and B share.
common_prefix() {
  awk 'NR == FNR { a[NR] = $0; na = NR; next }
       FNR > na || a[FNR] != $0 { print FNR - 1; done = 1; exit }
       END { if (!done) print (FNR < na ? FNR : na) }' "$1" "$2"
}

# snap_field DIR NAME: a field of DIR/snapshot.json (pretty-printed JSON).
snap_field() { json_field "$(tr -d ' \n' <"$1/snapshot.json")" "$2"; }

# The kernel of a VM must not have complained (RCU, devices, oopses).
check_console() {
  bad='Call Trace|BUG|Oops|rcu.*stall|soft lockup|virtio.*(error|timeout)|I/O error|EXT4-fs error'
  if grep -E -q "$bad" "$1"; then
    die_ctx "$2's kernel complained: $(grep -E -m3 "$bad" "$1")"
  fi
  # The TSC and kvmclock must agree after a restore (see snapshot-fork.sh).
  if grep -q "Marking clocksource 'tsc' as unstable" "$1"; then
    die_ctx "$2 marked the TSC unstable (TSC and kvmclock disagree)"
  fi
}

# branch_and_fork MODE DIR KIDS: branches the source in MODE into DIR, forks
# N children of it into KIDS and checks that each continues the count.
branch_and_fork() {
  mode=$1 dir=$2 kids=$3
  a=$(last_count pcli) || die_ctx "cannot read the source's count before the $mode branch"
  if [ "$mode" = live ]; then
    req="{\"op\":\"snapshot\",\"dir\":\"$dir\",\"mode\":\"live\",\"wait\":false}"
  else
    req="{\"op\":\"snapshot\",\"dir\":\"$dir\",\"mode\":\"$mode\"}"
  fi
  ts=$(now)
  s=$(ctl "$LAB_TMP/control.sock" "$req") || die_ctx "the $mode branch failed: $s"
  answered=$(since "$ts")
  b=$(last_count pcli) || die_ctx "the source stopped answering after the $mode branch"
  pause=$(json_field "$s" pause_ms)
  [ -n "$pause" ] || die_ctx "the $mode branch's answer has no pause_ms: $s"
  step "$mode branch: answered in $answered s, PAUSE $pause ms, status '$(json_field "$s" status)'; source count $a before, $b after"
  eval "pause_$mode=\$pause"
  if [ "$mode" = live ]; then
    # The copy runs in the background: snapshot.json says writing, then ready.
    tw=$(now)
    while :; do
      st=$(snap_field "$dir" status)
      case "$st" in
        ready) break ;;
        writing) ;;
        *) die_ctx "the live branch's status is '$st' (snapshot.json: $(cat "$dir/snapshot.json"))" ;;
      esac
      [ "$(awk "BEGIN{print ($(now) - $tw > 300)}")" = 0 ] || die_ctx "the live copy was still writing after 300 s"
      sleep 0.2
    done
    step "live copy ready $(since "$tw") s after the answer: $(snap_field "$dir" faults) write faults, longest stall $(snap_field "$dir" max_fault_stall_us) us, copy $(snap_field "$dir" duration_ms) ms"
    live_stall=$(snap_field "$dir" max_fault_stall_us)
    step "live branch: $(($(snap_field "$dir" memory_data_bytes) / 1024)) KiB of RAM with data, of $(($(snap_field "$dir" memory_bytes) / 1024)) KiB"
  else
    step "diff branch: $(($(snap_field "$dir" memory_data_bytes) / 1024)) KiB of pages changed since the live branch ($(du -k "$dir/memory.diff" | cut -f1) KiB non-zero in memory.diff)"
  fi
  # The source runs on: its count keeps increasing.
  c=$(wait_count_above "$b" 60 pcli) || die_ctx "the source's count stayed at $b for 60 s after the $mode branch (last read: $c)"
  read_count pcli >"$LAB_TMP/source.$mode" || die_ctx "cannot read the source's file"
  sc=$(check_gapless "$LAB_TMP/source.$mode" "the source's file after the $mode branch") || die_ctx "$sc"
  step "source runs on after the $mode branch: count $c, file gap-free to $sc"

  tf=$(now)
  "$LAB_VMM" fork --snapshot "$dir" -n "$N" --out-dir "$kids" --console-log >"$LAB_TMP/fork.out" 2>"$LAB_TMP/fork.err" ||
    { cat "$LAB_TMP/fork.err"; die_ctx "forkd-vmm fork of the $mode branch failed"; }
  step "forked $N children of the $mode branch in $(since "$tf") s"
  prev=""
  for i in $(seq 0 $((N - 1))); do
    tk=$(now)
    kcli "$kids" "$i" --wait-ms 60000 ping >/dev/null || die_ctx "$mode child $i's agent did not answer ping"
    tping=$(since "$tk")
    k0=$(last_count kcli "$kids" "$i") || die_ctx "cannot read $mode child $i's count"
    # Two more lines at least: the child is past a write the branch may
    # have caught half done.
    # (15 s: the guest writes about 100 lines a second in the lab; a child
    # whose timers stand still after the restore writes about none.)
    k1=$(wait_count_above $((k0 + 1)) 15 kcli "$kids" "$i") ||
      die_ctx "$mode child $i's count stayed at $k0 for 15 s (last read: $k1): the work did not continue"
    read_count kcli "$kids" "$i" >"$LAB_TMP/kid.$mode.$i" || die_ctx "cannot read $mode child $i's file"
    kf=$(check_gapless "$LAB_TMP/kid.$mode.$i" "$mode child $i's file") || die_ctx "$kf"
    # The branch point: where the child's lines part from the source's.
    p=$(common_prefix "$LAB_TMP/kid.$mode.$i" "$LAB_TMP/source.$mode")
    [ "$p" -ge "$a" ] && [ "$p" -le "$b" ] ||
      die_ctx "$mode child $i shares $p lines with the source, not between $a (before the branch) and $b (after it)"
    if [ -n "$prev" ] && [ "$p" != "$prev" ]; then
      die_ctx "$mode child $i branched at count $p, child 0 at $prev"
    fi
    prev=$p
    step "$mode child $i: branched at count $p (source had $a before, $b after); ping in $tping s, count $k0 at first, then $k1 ($(since "$tk") s); file gap-free to $kf: the work continues"
  done
  # Child 0 drops its page cache: its file, read back from its disk (the
  # branch's frozen layer under its own), must still be gap-free.
  kcli "$kids" 0 exec sh -c 'sync && echo 3 >/proc/sys/vm/drop_caches' || die_ctx "$mode child 0: sync and drop_caches failed"
  read_count kcli "$kids" 0 >"$LAB_TMP/kid.$mode.disk" || die_ctx "$mode child 0 cannot read its file back from the disk"
  k3=$(check_gapless "$LAB_TMP/kid.$mode.disk" "$mode child 0's file read back from its disk") || die_ctx "$k3"
  p=$(common_prefix "$LAB_TMP/kid.$mode.disk" "$LAB_TMP/source.$mode")
  [ "$p" = "$prev" ] || die_ctx "$mode child 0's file from its disk parts from the source's at $p, not $prev"
  step "$mode child 0: after sync and drop_caches its file from the disk is gap-free to $k3 and parts from the source's at $p"
  for i in $(seq 0 $((N - 1))); do
    check_console "$kids/$i/console.log" "$mode child $i"
    ctl "$kids/$i/control.sock" '{"op":"shutdown"}' >/dev/null || die_ctx "$mode child $i's shutdown failed"
  done
}

# --- the source ---
step "source: forkd-vmm run --kernel vmlinux --drive rootfs-agent.ext4,cow=<tmpfs> --vsock-uds --mem-mib 256 --memory-backend memfd"
t0=$(now)
"$LAB_VMM" run --kernel "$LAB_IMAGES/vmlinux" \
  --drive "$LAB_IMAGES/rootfs-agent.ext4,cow=$LAB_TMP/source.cow" \
  --cmdline "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4" \
  --vsock-uds "$LAB_TMP/vsock.sock" --control-socket "$LAB_TMP/control.sock" \
  --rng --mem-mib 256 --vcpus 1 --memory-backend memfd --console "$console" >"$vmmlog" 2>&1 &
source_pid=$!
pong=$(pcli --wait-ms 240000 ping) || die_ctx "the source's agent did not answer ping within 240 s"
step "source agent up after $(since "$t0") s"

printf '%s' "$COUNTER" >"$LAB_TMP/counter.py"
pcli write "$LAB_TMP/counter.py" /root/counter.py >/dev/null || die_ctx "cannot write the counter program"
pcli exec sh -c 'python3 /root/counter.py </dev/null >/dev/null 2>&1 & echo $! >/root/counter.pid' ||
  die_ctx "cannot start the counter"
tw=$(now)
n=$(wait_count_above 49 120 pcli) || die_ctx "the counter did not reach 50 in 120 s (last: $n)"
step "source: the counter runs (count $n after $(since "$tw") s)"

branch_and_fork live "$live" "$LAB_TMP/kids-live"
branch_and_fork diff "$diff" "$LAB_TMP/kids-diff"
check_console "$console" "the source"

ctl "$LAB_TMP/control.sock" '{"op":"shutdown"}' >/dev/null || die_ctx "the source's shutdown failed"
wait "$source_pid" || die_ctx "the source's forkd-vmm exited with status $? after shutdown"
step "PAUSE WINDOWS: live $pause_live ms (longest write-fault stall in the copy $live_stall us), diff $pause_diff ms"
step "branch-live scenario done in $(since "$t0") s"
