//! Host tests: the built-in guest under forkd-vmm on this machine's /dev/kvm.

mod common;

use std::time::Duration;

use common::{run_to_exit, wait_for_counter_above, ControlledVm, TempDir, TestVm};
use proto::control::{ControlRequest, ControlResponse, RunState};
use proto::guest::{GuestRequest, GuestResponse};
use vmm::boot::builtin::{abi, pattern_word};

const COUNTER: u64 = abi::INFO_ADDR + abi::INFO_COUNTER;

#[test]
fn builtin_guest_boots_and_answers_ping() {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "64", "--console", "none"]);
    assert_eq!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong {
            guest: "guest: builtin".into(),
            vcpus: 1
        }
    );
    let s = vm.status();
    assert_eq!(s.state, RunState::Running);
    assert_eq!(
        (s.vcpus, s.mem_mib, s.memory_backend.as_str()),
        (1, 64, "anonymous")
    );
    assert!(s.rss_bytes > 0);
    vm.shutdown();
}

#[test]
fn pause_stops_the_counter_and_resume_restarts_it() {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    vm.guest(GuestRequest::CounterStart);
    let running = wait_for_counter_above(|| vm.peek_u64(COUNTER), 0);
    wait_for_counter_above(|| vm.peek_u64(COUNTER), running);

    assert_eq!(vm.call(ControlRequest::Pause), ControlResponse::Ok);
    assert_eq!(vm.status().state, RunState::Paused);
    let paused_a = vm.peek_u64(COUNTER);
    std::thread::sleep(Duration::from_millis(100));
    let paused_b = vm.peek_u64(COUNTER);
    assert_eq!(paused_a, paused_b, "the counter moved while paused");
    // A paused guest cannot answer.
    let r = vm.call(ControlRequest::Guest {
        request: GuestRequest::CounterRead,
        timeout_ms: Some(100),
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("did not answer")),
        "{r:?}"
    );

    assert_eq!(vm.call(ControlRequest::Resume), ControlResponse::Ok);
    assert_eq!(vm.status().state, RunState::Running);
    std::thread::sleep(Duration::from_millis(20));
    let resumed = vm.peek_u64(COUNTER);
    assert!(
        resumed > paused_b,
        "the counter must run again after resume"
    );
    // The request that timed out while paused has been served by now, and
    // the guest answers new ones.
    match vm.guest(GuestRequest::CounterStop) {
        GuestResponse::Counter { value } => assert!(value >= resumed),
        other => panic!("{other:?}"),
    }
    // Resume of a running VM is refused with a reason.
    assert!(matches!(
        vm.call(ControlRequest::Resume),
        ControlResponse::Error { .. }
    ));
    vm.shutdown();
}

#[test]
fn fill_and_verify_across_the_mmio_gap() {
    // 3.5 GiB: RAM continues above 4 GiB. Fill 64 MiB that straddle the gap
    // (first touches are slow on a PVM host, so not all of it).
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "3584", "--console", "none"]);
    let low_room = (vmm::boot::layout::MMIO_GAP_START - abi::SCRATCH_START) >> 20;
    let (offset_mib, mib) = (low_room - 32, 64);
    assert_eq!(
        vm.guest(GuestRequest::Fill {
            seed: 7,
            seq: 1,
            mib,
            offset_mib
        }),
        GuestResponse::Filled { bytes: mib << 20 }
    );
    assert_eq!(
        vm.guest(GuestRequest::Verify {
            seed: 7,
            seq: 1,
            mib,
            offset_mib
        }),
        GuestResponse::Verified {
            bad_words: 0,
            first_bad_addr: None
        }
    );
    // The host reads the same pattern from guest memory, below and above the gap.
    let below = abi::SCRATCH_START + (offset_mib << 20);
    let gap = vmm::boot::layout::MMIO_GAP_START;
    for addr in [
        below,
        gap - 8,
        0x1_0000_0000,
        0x1_0000_0000 + (32 << 20) - 8,
    ] {
        assert_eq!(
            vm.peek_u64(addr),
            pattern_word(7, 1, addr),
            "word at {addr:#x}"
        );
    }
    // Nothing past the filled range was touched.
    assert_eq!(vm.peek_u64(0x1_0000_0000 + (32 << 20)), 0);
    assert_eq!(vm.peek_u64(below - 8), 0);
    // A wrong sequence number finds every word wrong, starting at the first.
    match vm.guest(GuestRequest::Verify {
        seed: 7,
        seq: 2,
        mib: 1,
        offset_mib,
    }) {
        GuestResponse::Verified {
            bad_words,
            first_bad_addr,
        } => {
            assert_eq!(bad_words, (1 << 20) / 8);
            assert_eq!(first_bad_addr, Some(below));
        }
        other => panic!("{other:?}"),
    }
    // More than the guest has is refused by the guest, which keeps running.
    for (mib, offset_mib) in [(4096, 0), (1, 3584), (u64::MAX, 0), (1, u64::MAX)] {
        let r = vm.call(ControlRequest::Guest {
            request: GuestRequest::Fill {
                seed: 1,
                seq: 1,
                mib,
                offset_mib,
            },
            timeout_ms: None,
        });
        assert!(
            matches!(r, ControlResponse::Error { ref message } if message.contains("not enough guest memory")),
            "{mib} MiB at {offset_mib}: {r:?}"
        );
    }
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();
}

#[test]
fn several_vcpus_boot_pause_and_resume() {
    let mut vm = TestVm::start(&[
        "--builtin",
        "--vcpus",
        "4",
        "--mem-mib",
        "32",
        "--console",
        "none",
    ]);
    assert_eq!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong {
            guest: "guest: builtin".into(),
            vcpus: 4
        }
    );
    for _ in 0..20 {
        assert_eq!(vm.call(ControlRequest::Pause), ControlResponse::Ok);
        assert_eq!(vm.call(ControlRequest::Resume), ControlResponse::Ok);
    }
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();
}

#[test]
fn each_boot_has_its_own_identity_and_memfd_backend_works() {
    let mut a = TestVm::start(&["--builtin", "--mem-mib", "16", "--console", "none"]);
    let mut b = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "16",
        "--console",
        "none",
        "--memory-backend",
        "memfd",
    ]);
    assert_eq!(b.status().memory_backend, "memfd");
    let id = |vm: &mut TestVm| match vm.guest(GuestRequest::Identity) {
        GuestResponse::Identity { boot_id, .. } => boot_id,
        other => panic!("{other:?}"),
    };
    let (ia, ib) = (id(&mut a), id(&mut b));
    assert_ne!(ia, ib);
    assert_eq!(ia, a.peek_u64(abi::INFO_ADDR + abi::INFO_BOOT_ID));
    a.shutdown();
    b.shutdown();
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "16", "--console", "none"]);
    let r = vm.call(ControlRequest::Peek {
        addr: 0,
        len: 1 << 20,
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("at most")),
        "{r:?}"
    );
    let r = vm.call(ControlRequest::Peek {
        addr: 1 << 40,
        len: 8,
    });
    assert!(matches!(r, ControlResponse::Error { .. }), "{r:?}");
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();
}

#[test]
fn bad_configurations_are_refused_with_a_reason() {
    let dir = TempDir::new("badcfg");
    let not_a_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, vec![0x5au8; 64 << 10]).unwrap();
    let nk = not_a_kernel.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--builtin", "--mem-mib", "0"], "out of range"),
        (
            &["run", "--builtin", "--mem-mib", "999999999"],
            "out of range",
        ),
        (&["run", "--builtin", "--vcpus", "200"], "vCPUs"),
        (
            &["run", "--kernel", nk, "--console", "none"],
            "not a Linux kernel",
        ),
        (
            &[
                "run",
                "--kernel",
                "/nonexistent/vmlinux",
                "--console",
                "none",
            ],
            "/nonexistent/vmlinux",
        ),
    ];
    for (args, expect) in cases {
        let (code, err) = run_to_exit(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err:?}"
        );
    }
}
