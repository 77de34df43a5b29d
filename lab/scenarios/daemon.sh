#!/bin/sh
# forkd-daemon serves a Linux snapshot through the v1 REST API (driven by the forkd CLI): snapshot once the agent answers (with a network interface), spawn children (each in its own network namespace), exec, eval and the network in them, branch one (diff) and fork from the branch, kill; then forkd-mcp on the host, through a port forward, makes a Linux snapshot and drives its child (compat/lab_linux.py), and the CLI drives the sandbox API on its children (lab/host/sandbox_api.py); stop
# needs: kernel agent-rootfs daemon forward
set -eu -o pipefail

state=$LAB_TMP/state
dlog=$LAB_TMP/daemon.log
export FORKD_URL=http://127.0.0.1:8889
# Each answer within two minutes (longer only where the CLI asks for more:
# a snapshot's boot wait), so a stuck request fails here with its context.
export FORKD_TIMEOUT=120
# Reachable from the host through lab/run's port forward, so with a token.
export FORKD_TOKEN="$(cat /lab/token)"
audit=$LAB_TMP/audit.log
context() {
  show_tail "$dlog" 40
  for f in "$state"/run/build-*/console.log "$state"/sandboxes/*/*/console.log; do
    [ -f "$f" ] && show_tail "$f" 25
  done
  for f in "$state"/run/build-*/vmm.log "$state"/sandboxes/*/*/vmm.log "$state"/run/*.fork.log; do
    [ -f "$f" ] && show_tail "$f" 10
  done
  return 0
}
die_ctx() { context; fail "$@"; }
# ids JSON: the "id" fields of a JSON array of sandboxes, one per line.
ids() { printf '%s\n' "$1" | tr -d ' \n' | grep -o '"id":"[^"]*"' | cut -d'"' -f4 || true; }
# netns JSON: the "netns" fields, the same way.
netns_of() { printf '%s\n' "$1" | tr -d ' \n' | grep -o '"netns":"[^"]*"' | cut -d'"' -f4 || true; }
# What the guest gets connecting to the host side of its link: "refused"
# (the namespace's kernel answered with a reset) shows both ways work.
probe='import socket
s = socket.socket()
s.settimeout(10)
try:
    s.connect(("172.16.0.1", 9))
    r = "connected"
except ConnectionRefusedError:
    r = "refused"
except OSError as e:
    r = repr(e)
r'
# check_net ID NS: the sandbox's guest and its namespace reach each other
# (iproute2's ip by its path: the shell would take busybox's applet).
check_net() {
  [ -e "/var/run/netns/$2" ] || die_ctx "sandbox $1's namespace $2 does not exist"
  got=$(forkd --json eval "$1" "$probe" 2>&1 | tr -d '\n ') || die_ctx "the network probe in $1 failed: $got"
  if [ "$(json_field "$got" result)" != "'refused'" ]; then
    echo "lab: $1's network: $(forkd exec "$1" -- cat /proc/cmdline /proc/net/dev /proc/net/route 2>&1)"
    echo "lab: namespace $2: $(/lab/bin/ip -n "$2" addr 2>&1)"
    die_ctx "$1 connecting to 172.16.0.1:9 got $got, not a refusal from its namespace"
  fi
  out=$(/lab/bin/ip netns exec "$2" ping -c 1 -W 10 172.16.0.2 2>&1) || die_ctx "ping 172.16.0.2 from namespace $2 failed: $out"
}

# Level 1 has 2 GiB of RAM and its state on a tmpfs of 1.5 GiB: the
# default reserves (512 MiB of disk, 256 MiB of memory) would refuse the
# second 512 MiB snapshot; a small machine sets small ones.
step "forkd-daemon serve --state-dir <tmpfs> --bind 0.0.0.0:8889 --token-file /lab/token --images-dir \$LAB_IMAGES --reserve-disk-mib 64 --reserve-memory-mib 64 (forkd-vmm beside it)"
t0=$(now)
forkd-daemon serve --state-dir "$state" --bind 0.0.0.0:8889 --token-file /lab/token \
  --audit-log "$audit" --images-dir "$LAB_IMAGES" --reserve-disk-mib 64 --reserve-memory-mib 64 \
  >"$dlog" 2>&1 &
dpid=$!
up="" err=""
for _ in $(seq 1 200); do
  if err=$(forkd --json version 2>&1); then up=1; break; fi
  sleep 0.1
done
[ -n "$up" ] || die_ctx "the daemon did not answer within 20 s: $err"
step "daemon up: $(forkd --json version | tr -d '\n ')"

step "forkd snapshot linux --kernel vmlinux --rootfs rootfs-agent.ext4 --rw --mem-mib 512 --network"
t=$(now)
snap=$(forkd --json snapshot linux --kernel "$LAB_IMAGES/vmlinux" --rootfs "$LAB_IMAGES/rootfs-agent.ext4" \
  --rw --mem-mib 512 --boot-wait-secs 300 --network 2>&1) || die_ctx "snapshot failed: $snap"
step "snapshot made in $(since "$t") s (boot, agent ping, snapshot): $(printf '%s' "$snap" | tr -d '\n ')"
[ "$(json_field "$(printf '%s' "$snap" | tr -d '\n ')" status)" = ready ] || die_ctx "the snapshot is not ready: $snap"

step "forkd spawn --tag linux -n 2"
t=$(now)
kids=$(forkd --json spawn --tag linux -n 2 2>&1) || die_ctx "spawn failed: $kids"
k0=$(ids "$kids" | sed -n 1p)
k1=$(ids "$kids" | sed -n 2p)
[ -n "$k0" ] && [ -n "$k1" ] || die_ctx "spawn answered no ids: $kids"
n0=$(netns_of "$kids" | sed -n 1p)
n1=$(netns_of "$kids" | sed -n 2p)
[ -n "$n0" ] && [ -n "$n1" ] && [ "$n0" != "$n1" ] || die_ctx "the children have no namespaces of their own: $kids"
step "spawned $k0 (namespace $n0) and $k1 (namespace $n1) in $(since "$t") s"

for k in "$k0" "$k1"; do
  pong=$(forkd --json ping "$k" 2>&1 | tr -d '\n ') || die_ctx "ping $k failed: $pong"
  [ "$(json_field "$pong" guest)" = "guest:linux" ] || die_ctx "ping $k answered $pong, not guest: linux"
  out=$(forkd exec "$k" -- uname -a 2>&1) || die_ctx "exec uname in $k failed: $out"
  case "$out" in Linux*forkd*) ;; *) die_ctx "uname -a in $k answered '$out', not our kernel" ;; esac
  ev=$(forkd --json eval "$k" 'numpy.zeros(5).sum()' 2>&1 | tr -d '\n ') || die_ctx "eval in $k failed: $ev"
  case "$(json_field "$ev" result)" in *0.0*) ;; *) die_ctx "eval in $k answered $ev, not 0.0 (numpy warmed before the snapshot)" ;; esac
done
step "both children answer ping, exec uname -a and eval with the warm numpy"
check_net "$k0" "$n0"
check_net "$k1" "$n1"
step "both children, with the same address, reach the host side of their own link and answer a ping from it"

rc=0
forkd exec "$k0" -- sh -c 'exit 7' >/dev/null 2>&1 || rc=$?
[ "$rc" = 7 ] || die_ctx "exec of 'exit 7' gave status $rc through the CLI"

# Writes in one child stay its own; a branch carries them.
forkd exec "$k0" -- sh -c 'echo branch-mark-42 >/root/mark && sync' >/dev/null || die_ctx "writing /root/mark in $k0 failed"
forkd eval "$k0" 'marker = 6 * 7' >/dev/null || die_ctx "setting an interpreter variable in $k0 failed"
if forkd exec "$k1" -- cat /root/mark >/dev/null 2>&1; then die_ctx "$k1 sees $k0's file: the children share a disk layer"; fi

step "forkd snapshot b1 --from-sandbox $k0 --diff"
b1=$(forkd --json snapshot b1 --from-sandbox "$k0" --diff 2>&1 | tr -d '\n ') || die_ctx "diff branch failed: $b1"
[ "$(json_field "$b1" status)" = ready ] || die_ctx "the branch is not ready: $b1"
[ "$(json_field "$b1" kind)" = diff ] || die_ctx "the branch is not a diff: $b1"
step "branch b1: pause $(json_field "$b1" pause_ms) ms"
info=$(forkd --json snapshot-info b1 | tr -d '\n ')
[ "$(json_field "$info" parent_tag)" = linux ] || die_ctx "b1's parent is not linux: $info"

gk=$(forkd --json spawn --tag b1 -n 1 2>&1) || die_ctx "spawn from b1 failed: $gk"
g=$(ids "$gk" | sed -n 1p)
check_net "$g" "$(netns_of "$gk" | sed -n 1p)"
mark=$(forkd exec "$g" -- cat /root/mark 2>&1) || die_ctx "reading /root/mark in the branch's child failed: $mark"
[ "$mark" = branch-mark-42 ] || die_ctx "the branch's child read '$mark', not the source's file"
ev=$(forkd --json eval "$g" 'marker' 2>&1 | tr -d '\n ') || die_ctx "eval in $g failed: $ev"
[ "$(json_field "$ev" result)" = 42 ] || die_ctx "the branch's child's interpreter has marker=$ev, not 42"
step "the branch's child has the source's file and interpreter state"

# A live branch of a jailed sandbox: its VMM writes into a directory bound
# into its jail while the copy runs, and the daemon takes it out once the
# snapshot is ready.
step "forkd spawn --tag linux --live-fork; forkd snapshot l1 --from-sandbox <it> --live --no-wait"
lk=$(forkd --json spawn --tag linux -n 1 --live-fork 2>&1) || die_ctx "live-fork spawn failed: $lk"
lv=$(ids "$lk" | sed -n 1p)
forkd exec "$lv" -- sh -c 'echo live-mark-7 >/root/live && sync' >/dev/null || die_ctx "writing /root/live in $lv failed"
l1=$(forkd --json snapshot l1 --from-sandbox "$lv" --live --no-wait 2>&1 | tr -d '\n ') || die_ctx "live branch failed: $l1"
t=$(now)
until [ "$(json_field "$(forkd --json snapshot-info l1 | tr -d '\n ')" status)" = ready ]; do
  awk "BEGIN{exit !($(since "$t") < 120)}" || die_ctx "the live branch l1 is not ready after 120 s: $(forkd --json snapshot-info l1)"
  sleep 1
done
vpid=$(json_field "$(printf '%s' "$lk" | tr -d '\n ')" pid)
ldir=$(json_field "$(forkd --json snapshot-info l1 | tr -d '\n ')" dir)
[ -n "$vpid" ] && [ -n "$ldir" ] || die_ctx "no pid for $lv ($lk) or no directory for l1"
[ -d "/proc/$vpid/root/proc" ] && [ ! -e "/proc/$vpid/root/lab" ] ||
  die_ctx "$lv's VMM (pid $vpid) is not in a jail of its own: its root holds $(ls "/proc/$vpid/root" | tr '\n' ' ')"
[ ! -e "/proc/$vpid/root$ldir" ] || die_ctx "l1's directory $ldir is still in $lv's jail after the copy"
lg=$(forkd --json spawn --tag l1 -n 1 2>&1) || die_ctx "spawn from l1 failed: $lg"
lc=$(ids "$lg" | sed -n 1p)
mark=$(forkd exec "$lc" -- cat /root/live 2>&1) || die_ctx "reading /root/live in l1's child failed: $mark"
[ "$mark" = live-mark-7 ] || die_ctx "l1's child read '$mark', not the source's file"
step "live branch l1 ready in $(since "$t") s; out of the source's jail; its child reads the source's file"
forkd kill "$lv" "$lc" >/dev/null || die_ctx "kill $lv $lc failed"
step "level 1 memory: $(grep -E '^(MemAvailable|Shmem|AnonPages):' /proc/meminfo | tr -s ' \n' ' ')"

# cgroup v2 (level 1 mounts a unified hierarchy, as a host would): a
# sandbox's limits are in its own group, which holds its VMM, and a guest
# spinning its vCPU stays within its CPU limit.
step "forkd spawn --tag linux --cpu-limit 0.5 --memory-limit-mib 768 --pids-limit 256; spin its vCPU for 10 s"
ck=$(forkd --json spawn --tag linux -n 1 --cpu-limit 0.5 --memory-limit-mib 768 --pids-limit 256 2>&1 | tr -d '\n ') ||
  die_ctx "spawn with limits failed: $ck"
c=$(ids "$ck" | sed -n 1p)
cg=/sys/fs/cgroup/$(json_field "$ck" cgroup)
[ -d "$cg" ] || die_ctx "$c's group $cg does not exist: $ck"
grep -qx "$(json_field "$ck" pid)" "$cg/cgroup.procs" || die_ctx "$c's VMM is not in $cg: $(cat "$cg/cgroup.procs")"
for f in "cpu.max=50000 100000" "memory.max=$((768 << 20))" "pids.max=256"; do
  [ "$(cat "$cg/${f%%=*}")" = "${f#*=}" ] || die_ctx "$cg/${f%%=*} is '$(cat "$cg/${f%%=*}")', not '${f#*=}'"
done
u0=$(awk '/^usage_usec/{print $2}' "$cg/cpu.stat")
t=$(now)
forkd exec "$c" -- sh -c 'timeout 10 sh -c "while :; do :; done"; true' >/dev/null 2>&1 ||
  die_ctx "the spinning exec in $c failed"
u1=$(awk '/^usage_usec/{print $2}' "$cg/cpu.stat")
share=$(awk "BEGIN{printf \"%.3f\", ($u1 - $u0) / 1000000 / ($(now) - $t)}")
step "$c's VMM used $share of a CPU over $(since "$t") s under cpu_limit 0.5"
awk "BEGIN{exit !($share <= 0.55)}" || die_ctx "$c used $share of a CPU, more than 10% over its limit 0.5"
awk "BEGIN{exit !($share >= 0.3)}" || die_ctx "$c used only $share of a CPU: its guest did not spin"

# The pids limit holds against the VMM itself (guest processes are not
# host tasks): a test-only control operation asks it for 400 threads more.
cdir="$state/sandboxes/${c%-*}/${c##*-}"
th=$(forkd-vmm ctl --control-socket "$cdir/control.sock" '{"op":"threads_self_test","threads":400}' 2>&1 | tr -d '\n') ||
  die_ctx "the threads self-test in $c failed: $th"
started=$(printf '%s' "$th" | grep -o '"started": *[0-9]*' | grep -o '[0-9]*$')
[ -n "$started" ] && [ "$started" -lt 256 ] || die_ctx "$c's VMM started ${started:-?} threads under pids_limit 256: $th"
case "$th" in *refused*) ;; *) die_ctx "the kernel refused none of $c's 400 threads: $th" ;; esac
step "$c's VMM started $started of 400 more threads under pids.max 256: $(json_field "$(printf '%s' "$th" | tr -d ' ')" refused)"

# Past its memory limit the kernel kills the VMM, and the sandbox says so.
step "forkd spawn --tag linux --memory-limit-mib 256 (512 MiB guest); the guest fills 320 MiB"
mk=$(forkd --json spawn --tag linux -n 1 --memory-limit-mib 256 2>&1 | tr -d '\n ') ||
  die_ctx "spawn with a memory limit failed: $mk"
m=$(ids "$mk" | sed -n 1p)
forkd exec "$m" -- python3 -c 'x = b"\1" * (320 << 20); print(len(x))' >/dev/null 2>&1 || true
entry=""
for _ in $(seq 1 100); do
  entry=$(forkd --json ls --all | tr -d ' \n' | sed 's/},{/}\n{/g' | grep "\"id\":\"$m\"" || true)
  [ "$(json_field "$entry" state)" = exited ] && break
  sleep 0.2
done
[ "$(json_field "$entry" state)" = exited ] || die_ctx "$m outlived a guest filling 320 MiB under a 256 MiB limit: $entry"
[ "$(json_field "$entry" oom_killed)" = true ] || die_ctx "$m ended, but not by the OOM killer: $entry"
step "$m's VMM was OOM-killed past its limit: signal $(json_field "$entry" signal), $(json_field "$entry" exit_detail)"

# A disk quota: the guest's writes past it fail as I/O errors, the
# host's layer file stops growing, and the VMM counts the refusals.
# A disk bandwidth cap needs a block device under the sandboxes; this
# daemon's state directory is a tmpfs, so the cap is refused, saying why,
# and nothing is spawned.
io=$(forkd --json spawn --tag linux -n 1 --io-limit-mibps 8 2>&1) &&
  die_ctx "a disk cap on a tmpfs state directory was accepted: $io"
case "$io" in *"no block device"*) ;; *) die_ctx "the refused disk cap does not say why: $io" ;; esac
step "a disk cap on the tmpfs state directory is refused: $(printf '%s' "$io" | tr -d '\n' | cut -c1-160)"

step "forkd spawn --tag linux --disk-quota-mib 16; dd 48 MiB into its disk"
qk=$(forkd --json spawn --tag linux -n 1 --disk-quota-mib 16 2>&1 | tr -d '\n ') ||
  die_ctx "spawn with a disk quota failed: $qk"
q=$(ids "$qk" | sed -n 1p)
[ "$(json_field "$qk" disk_quota_mib)" = 16 ] || die_ctx "$q does not say its quota: $qk"
qdir="$state/sandboxes/${q%-*}/${q##*-}"
[ -f "$qdir/disk0.cow" ] || die_ctx "$q has no disk layer at $qdir/disk0.cow"
out=$(forkd exec "$q" -- sh -c 'dd if=/dev/zero of=/root/big bs=1M count=48 conv=fsync 2>&1; echo "dd-rc=$?"' 2>&1) ||
  die_ctx "the dd exec in $q failed: $out"
case "$out" in *dd-rc=0*) die_ctx "48 MiB of writes under a 16 MiB quota succeeded in $q: $out" ;; esac
size=$(stat -c %s "$qdir/disk0.cow")
[ "$size" -le $((17 << 20)) ] || die_ctx "$q's layer grew to $size bytes under a 16 MiB quota"
st=$(forkd-vmm ctl --control-socket "$qdir/control.sock" '{"op":"status"}' 2>&1 | tr -d '\n ') ||
  die_ctx "status of $q failed: $st"
refused=$(printf '%s' "$st" | grep -o '"disk_quota_refusals":[0-9]*' | cut -d: -f2)
[ "${refused:-0}" -gt 0 ] || die_ctx "$q's VMM counted no refused writes: $st"
step "dd in $q: $(printf '%s' "$out" | tail -2 | tr '\n' ' '); layer $((size >> 10)) KiB; $refused writes refused"

step "forkd kill --all; forkd rmi linux --cascade"
forkd kill --all >/dev/null || die_ctx "kill --all failed"
[ "$(forkd --json ls | tr -d '\n ')" = "[]" ] || die_ctx "sandboxes left after kill --all: $(forkd --json ls)"
left=$(ls /var/run/netns 2>/dev/null | tr '\n' ' ')
[ -z "$left" ] || die_ctx "network namespaces left after kill --all: $left"
forkd rmi linux --cascade >/dev/null || die_ctx "rmi --cascade failed"
[ "$(forkd --json images | tr -d '\n ')" = "[]" ] || die_ctx "snapshots left after rmi --cascade: $(forkd --json images)"

# The published clients, from the host, through the port forward: a Linux
# snapshot made by forkd-mcp's create_snapshot, and its children driven
# by its tools (lab/run's LAB_HOST_STEP; crates/vmm-bin/tests/lab.rs sets
# it). Level 1 waits for the host step's end in the audit log.
step "LAB-FORWARD-READY: the host's clients drive this daemon now"
echo "LAB-FORWARD-READY"
done_rc=""
for _ in $(seq 1 900); do
  done_rc=$(grep -o '/lab/host-done/rc-[0-9]*' "$audit" 2>/dev/null | head -1 | cut -d- -f3 || true)
  [ -n "$done_rc" ] && break
  sleep 1
done
[ -n "$done_rc" ] || die_ctx "the host step did not end within 900 s"
[ "$done_rc" = 0 ] || die_ctx "the host step failed (exit $done_rc; its output is in lab/run's log on the host)"
step "the host step passed"
forkd kill --all >/dev/null || die_ctx "kill --all after the host step failed"

kill -TERM "$dpid"
rc=0
wait "$dpid" || rc=$?
[ "$rc" = 0 ] || die_ctx "forkd-daemon exited with status $rc after SIGTERM"
step "daemon scenario done in $(since "$t0") s"
