#!/bin/sh
# forkd-vmm boots our kernel with the agent rootfs (forkd-agent as PID 1, numpy warmed at boot) and a vsock socket; the agent answers ping, exec, eval, a 4 MiB file round trip and a 64 MiB read, again with the host busy and the reader stopped at random
# needs: kernel agent-rootfs

cli() { forkd-agent-cli --vsock-uds "$LAB_TMP/vsock.sock" "$@"; }
console=$LAB_TMP/console.log
vmmlog=$LAB_TMP/vmm.log
context() { show_tail "$console" 60; show_tail "$vmmlog" 20; }

step "forkd-vmm run --kernel vmlinux --drive rootfs-agent.ext4,cow=<tmpfs> --vsock-uds --rng --mem-mib 512"
t0=$(now)
"$LAB_VMM" run --kernel "$LAB_IMAGES/vmlinux" \
  --drive "$LAB_IMAGES/rootfs-agent.ext4,cow=$LAB_TMP/rootfs.cow" \
  --cmdline "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4" \
  --vsock-uds "$LAB_TMP/vsock.sock" --control-socket "$LAB_TMP/control.sock" \
  --rng --mem-mib 512 --vcpus 1 --console "$console" >"$vmmlog" 2>&1 &
vmm_pid=$!

pong=$(cli --wait-ms 240000 ping) || { context; fail "the agent did not answer ping within 240 s of the boot"; }
step "agent up $(since "$t0") s after the VMM started: $pong"
[ "$(json_field "$pong" guest)" = "guest: linux" ] || fail "ping answered $pong, not guest: linux"

out=$(cli exec uname -a) || { context; fail "exec uname -a failed (status $?)"; }
step "exec uname -a: $out"
case "$out" in Linux*forkd*) ;; *) fail "uname -a answered '$out', not our Linux kernel" ;; esac

rc=0
cli exec sh -c 'echo to-stderr >&2; exit 7' 2>"$LAB_TMP/stderr" || rc=$?
step "exec sh -c 'exit 7': status $rc, stderr '$(cat "$LAB_TMP/stderr")'"
[ "$rc" = 7 ] || fail "a guest process exiting 7 gave status $rc"
grep -q to-stderr "$LAB_TMP/stderr" || fail "the guest process's stderr did not come through"

ev=$(cli eval 'numpy.zeros(5).sum()') || { context; fail "eval numpy.zeros(5).sum() failed: $ev"; }
step "eval numpy.zeros(5).sum() (numpy imported by the boot-time warm-up): $ev"
case "$(json_field "$ev" result)" in *0.0*) ;; *) fail "eval answered $ev, not 0.0" ;; esac

dd if=/dev/urandom of="$LAB_TMP/blob" bs=1M count=4 2>/dev/null
want=$(sha256sum "$LAB_TMP/blob" | cut -d' ' -f1)
w=$(cli write "$LAB_TMP/blob" /root/blob) || { context; fail "write of 4 MiB failed"; }
step "write 4 MiB to /root/blob (the rootfs disk): $w"
inguest=$(cli exec sha256sum /root/blob | cut -d' ' -f1)
r=$(cli read /root/blob "$LAB_TMP/blob.back") || { context; fail "read of /root/blob failed"; }
got=$(sha256sum "$LAB_TMP/blob.back" | cut -d' ' -f1)
step "read it back: $r; sha256 host $want, guest $inguest, read back $got"
[ "$inguest" = "$want" ] || fail "the file in the guest differs from what was written"
[ "$got" = "$want" ] || fail "the file read back differs from what was written"

# A guest that closes right behind its last byte while the host reader is
# behind must not lose the tail (the vsock device once dropped it). 64 MiB
# made in the guest's /tmp (a tmpfs), read back whole; then again with level
# 1 deliberately busy (two spinning shells on its one CPU) and the reader
# stopped and continued at random, so the guest often finishes while the
# host is behind.
bigsum=$(cli exec sh -c 'head -c 67108864 /dev/urandom >/tmp/big && sha256sum /tmp/big' | cut -d' ' -f1) ||
  { context; fail "making 64 MiB in the guest's /tmp failed"; }
[ ${#bigsum} = 64 ] || fail "sha256sum in the guest answered '$bigsum'"
t=$(now)
r=$(cli read /tmp/big "$LAB_TMP/big") || { context; fail "read of the 64 MiB /tmp/big failed"; }
got=$(sha256sum "$LAB_TMP/big" | cut -d' ' -f1)
rm -f "$LAB_TMP/big"
step "read 64 MiB back in $(since "$t") s: $r; sha256 guest $bigsum, read back $got"
[ "$got" = "$bigsum" ] || fail "the 64 MiB read back differs from the guest's file"

spin() { while :; do :; done; }
spin & spin1=$!
spin & spin2=$!
t=$(now)
forkd-agent-cli --vsock-uds "$LAB_TMP/vsock.sock" read /tmp/big "$LAB_TMP/big" >"$LAB_TMP/read.out" 2>&1 &
reader=$!
stops=0
while kill -0 "$reader" 2>/dev/null; do
  usleep $(((RANDOM % 200 + 1) * 1000))
  if kill -STOP "$reader" 2>/dev/null; then
    usleep $(((RANDOM % 100 + 1) * 1000))
    kill -CONT "$reader" 2>/dev/null
    stops=$((stops + 1))
  fi
done
rc=0
wait "$reader" || rc=$?
kill "$spin1" "$spin2"
got=$(sha256sum "$LAB_TMP/big" 2>/dev/null | cut -d' ' -f1)
rm -f "$LAB_TMP/big"
step "read 64 MiB with the host busy in $(since "$t") s, the reader stopped $stops times: status $rc, $(cat "$LAB_TMP/read.out"); read back $got"
[ "$rc" = 0 ] || { context; fail "read of /tmp/big with the host busy failed: $(cat "$LAB_TMP/read.out")"; }
[ "$got" = "$bigsum" ] || fail "the 64 MiB read back with the host busy differs from the guest's file"
# Nothing was lost, so the VMM's log names no connection it ended.
if grep -q "vsock:" "$vmmlog"; then
  show_tail "$vmmlog" 20
  fail "the VMM's log reports vsock connections it ended: $(grep "vsock:" "$vmmlog" | head -n 3)"
fi

step "shutdown through the control socket"
forkd-vmm ctl --control-socket "$LAB_TMP/control.sock" '{"op":"shutdown"}' >/dev/null || fail "control shutdown failed"
rc=0
wait "$vmm_pid" || rc=$?
[ "$rc" = 0 ] || { context; fail "forkd-vmm exited with status $rc after shutdown"; }
step "agent scenario done in $(since "$t0") s"
