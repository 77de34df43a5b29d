#!/bin/sh
# boot the agent rootfs, warm (import numpy; x = 41), snapshot through the control socket, fork 5 children: each evals x + 1 and numpy without re-importing; a file one child writes (tmpfs and disk) is absent in the others
# needs: kernel agent-rootfs

N=5
snap=$LAB_TMP/snap
kids=$LAB_TMP/kids
console=$LAB_TMP/console.log
vmmlog=$LAB_TMP/vmm.log
ctl() { forkd-vmm ctl --control-socket "$1" "$2"; }
pcli() { forkd-agent-cli --vsock-uds "$LAB_TMP/vsock.sock" "$@"; }
kcli() { i=$1; shift; forkd-agent-cli --vsock-uds "$kids/$i/vsock.sock" "$@"; }
context() {
  show_tail "$console" 60
  show_tail "$vmmlog" 20
  for i in $(seq 0 $((N - 1))); do
    show_tail "$kids/$i/console.log" 30
    show_tail "$kids/$i/vmm.log" 20
  done
}
die_ctx() { context; fail "$@"; }

# --- the parent ---
step "parent: forkd-vmm run --kernel vmlinux --drive rootfs-agent.ext4,cow=<tmpfs> --vsock-uds --mem-mib 256"
t0=$(now)
"$LAB_VMM" run --kernel "$LAB_IMAGES/vmlinux" \
  --drive "$LAB_IMAGES/rootfs-agent.ext4,cow=$LAB_TMP/parent.cow" \
  --cmdline "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4" \
  --vsock-uds "$LAB_TMP/vsock.sock" --control-socket "$LAB_TMP/control.sock" \
  --rng --mem-mib 256 --vcpus 1 --console "$console" >"$vmmlog" 2>&1 &
parent=$!
pong=$(pcli --wait-ms 240000 ping) || die_ctx "the parent's agent did not answer ping within 240 s"
step "parent agent up after $(since "$t0") s: $pong"

# Cold: numpy imported by a fresh interpreter, timed inside the guest.
cold=$(pcli exec python3 -c 'import time; t = time.perf_counter(); import numpy; print("%.1f" % ((time.perf_counter() - t) * 1e3))') ||
  die_ctx "a cold python3 -c 'import numpy' failed in the parent"
step "parent: cold import numpy in a fresh interpreter: $cold ms (guest clock)"
ev=$(pcli eval 'import numpy; x = 41') || die_ctx "the parent's warm-up eval failed: $ev"
step "parent: eval 'import numpy; x = 41' (waits for the boot-time warm-up): $ev"
ev=$(pcli eval 'x + 1') || die_ctx "eval x + 1 failed in the parent: $ev"
[ "$(json_field "$ev" result)" = 42 ] || fail "the parent answered $ev to x + 1"

# --- snapshot ---
ts=$(now)
s=$(ctl "$LAB_TMP/control.sock" "{\"op\":\"snapshot\",\"dir\":\"$snap\"}") || die_ctx "snapshot failed: $s"
step "snapshot written in $(since "$ts") s (pause $(json_field "$s" pause_ms) ms): $(ls "$snap" | tr '\n' ' ')"
step "snapshot memory file: $(du -k "$snap/memory" | cut -f1) KiB on disk of $(($(stat -c %s "$snap/memory") / 1024)) KiB"
# The parent runs on after the snapshot; it is not needed any more.
ev=$(pcli eval 'x + 1') || die_ctx "the parent stopped answering after the snapshot: $ev"
ctl "$LAB_TMP/control.sock" '{"op":"shutdown"}' >/dev/null || die_ctx "the parent's shutdown failed"
wait "$parent" || die_ctx "the parent's forkd-vmm exited with status $? after shutdown"

# --- fork ---
tf=$(now)
"$LAB_VMM" fork --snapshot "$snap" -n "$N" --out-dir "$kids" --console-log >"$LAB_TMP/fork.out" 2>"$LAB_TMP/fork.err" ||
  { cat "$LAB_TMP/fork.err"; die_ctx "forkd-vmm fork failed"; }
step "forked $N children in $(since "$tf") s: $(wc -l <"$LAB_TMP/fork.out") lines"
[ "$(wc -l <"$LAB_TMP/fork.out")" = "$N" ] || die_ctx "fork printed $(wc -l <"$LAB_TMP/fork.out") lines, not $N"

for i in $(seq 0 $((N - 1))); do
  p=$(kcli "$i" --wait-ms 60000 ping) || die_ctx "child $i's agent did not answer ping"
  a=$(kcli "$i" eval 'x + 1') || die_ctx "child $i: eval x + 1 failed: $a"
  [ "$(json_field "$a" result)" = 42 ] || die_ctx "child $i answered $a to x + 1, not 42"
  b=$(kcli "$i" eval "numpy.zeros(3).sum(), 'numpy' in __import__('sys').modules") ||
    die_ctx "child $i: eval numpy.zeros(3).sum() failed: $b"
  case "$(json_field "$b" result)" in *0.0*True*) ;; *) die_ctx "child $i answered $b to numpy.zeros(3).sum()" ;; esac
  step "child $i: ping $(json_field "$p" client_ms) ms (agent uptime $(json_field "$p" uptime_ms) ms); eval x + 1 = 42 in $(json_field "$a" client_ms) ms; numpy.zeros(3).sum() without importing in $(json_field "$b" client_ms) ms (cold import in the parent: $cold ms)"
done

# --- isolation: child 0 writes a mark on its tmpfs and on its disk ---
kcli 0 exec sh -c 'echo hi >/tmp/mark && echo hi >/root/mark && sync' || die_ctx "child 0 could not write its marks"
m=$(kcli 0 exec cat /tmp/mark /root/mark) || die_ctx "child 0 cannot read its own marks"
[ "$(echo $m)" = "hi hi" ] || die_ctx "child 0 read '$m' from its marks"
for i in $(seq 1 $((N - 1))); do
  kcli "$i" exec sh -c 'echo 3 >/proc/sys/vm/drop_caches; test ! -e /tmp/mark && test ! -e /root/mark' ||
    die_ctx "child $i sees the mark child 0 wrote"
done
step "child 0's /tmp/mark and /root/mark are absent in children 1..$((N - 1)); disk layers (KiB): $(for i in $(seq 0 $((N - 1))); do du -k "$kids/$i/disk0.cow" | cut -f1; done | tr '\n' ' ')"

# The restored kernels must not have complained (RCU, devices, oopses).
bad='Call Trace|BUG|rcu.*stall|soft lockup|virtio.*(error|timeout)'
for i in $(seq 0 $((N - 1))); do
  if grep -E -q "$bad" "$kids/$i/console.log"; then
    die_ctx "child $i's kernel complained after the restore: $(grep -E -m3 "$bad" "$kids/$i/console.log")"
  fi
  # The guest TSC is set after kvmclock, from their relation at the
  # snapshot: a child's clock watchdog must see them agree and keep the TSC.
  if grep -q "Marking clocksource 'tsc' as unstable" "$kids/$i/console.log"; then
    die_ctx "child $i marked the TSC unstable after the restore (TSC and kvmclock disagree): $(grep -A2 'Marking clocksource' "$kids/$i/console.log" | grep -o "[a-z-]*' [a-z]*_nsec: [0-9]*" | tr '\n' ' ')"
  fi
  if grep -q "the restored guest TSC" "$kids/$i/vmm.log" 2>/dev/null; then
    die_ctx "child $i: $(grep -m1 'the restored guest TSC' "$kids/$i/vmm.log")"
  fi
done
for i in $(seq 0 $((N - 1))); do
  cs=$(kcli "$i" exec sh -c 'cat /sys/devices/system/clocksource/clocksource0/available_clocksource; dmesg | grep -c "clocksource .tsc. as unstable"; true') ||
    die_ctx "child $i: cannot read its clocksources"
  case "$cs" in *tsc*) ;; *) die_ctx "child $i lost the TSC clocksource after the restore: $cs" ;; esac
  step "child $i: clocksources and TSC-unstable messages in its kernel log: $(echo $cs)"
done
step "child 0's console after the restore ($(wc -l <"$kids/0/console.log") lines):"
tail -n 5 "$kids/0/console.log"
u=$(kcli 0 exec cat /proc/uptime) || die_ctx "child 0: exec cat /proc/uptime failed"
step "child 0's guest uptime now: $u (the parent's at the snapshot was about $(json_field "$pong" uptime_ms) ms at ping plus the warm-up)"

for i in $(seq 0 $((N - 1))); do
  ctl "$kids/$i/control.sock" '{"op":"shutdown"}' >/dev/null || die_ctx "child $i's shutdown failed"
done
step "snapshot-fork scenario done in $(since "$t0") s"
