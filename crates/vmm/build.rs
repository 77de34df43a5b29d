//! Builds the built-in guest (guest/builtin) into a static ELF that
//! forkd-vmm embeds. The guest's addresses and ports come from
//! src/boot/builtin/abi.rs, handed to the C compiler as -D definitions.

use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
mod abi {
    include!("src/boot/builtin/abi.rs");
}

/// Every abi.rs constant as NAME=value, so the C side cannot drift.
fn definitions() -> Vec<(&'static str, u64)> {
    use abi::*;
    vec![
        ("LOAD_ADDR", LOAD_ADDR),
        ("INFO_ADDR", INFO_ADDR),
        ("MAILBOX_ADDR", MAILBOX_ADDR),
        ("SCRATCH_START", SCRATCH_START),
        ("INFO_MAGIC", INFO_MAGIC),
        ("INFO_LOW_RAM_END", INFO_LOW_RAM_END),
        ("INFO_HIGH_RAM_SIZE", INFO_HIGH_RAM_SIZE),
        ("INFO_NUM_VCPUS", INFO_NUM_VCPUS),
        ("INFO_BOOT_ID", INFO_BOOT_ID),
        ("INFO_VM_GENERATION", INFO_VM_GENERATION),
        ("INFO_COUNTER", INFO_COUNTER),
        ("INFO_MAGIC_VALUE", INFO_MAGIC_VALUE),
        ("INFO_STAMP_COUNT", INFO_STAMP_COUNT),
        ("INFO_STAMP_BASE", INFO_STAMP_BASE),
        ("INFO_STAMP_PAGES", INFO_STAMP_PAGES),
        ("MB_DOORBELL", MB_DOORBELL),
        ("MB_OP", MB_OP),
        ("MB_ARGS", MB_ARGS),
        ("MB_NUM_ARGS", MB_NUM_ARGS),
        ("MB_STATUS", MB_STATUS),
        ("MB_RESULTS", MB_RESULTS),
        ("MB_NUM_RESULTS", MB_NUM_RESULTS),
        ("MB_TEXT_LEN", MB_TEXT_LEN),
        ("MB_TEXT", MB_TEXT),
        ("MB_TEXT_MAX", MB_TEXT_MAX),
        ("PORT_WAIT", PORT_WAIT),
        ("PORT_DONE", PORT_DONE),
        ("PORT_PANIC", PORT_PANIC),
        ("PORT_PARK", PORT_PARK),
        ("OP_PING", OP_PING),
        ("OP_IDENTITY", OP_IDENTITY),
        ("OP_FILL", OP_FILL),
        ("OP_VERIFY", OP_VERIFY),
        ("OP_COUNTER_START", OP_COUNTER_START),
        ("OP_COUNTER_READ", OP_COUNTER_READ),
        ("OP_COUNTER_STOP", OP_COUNTER_STOP),
        ("OP_STAMP_START", OP_STAMP_START),
        ("OP_STAMP_VERIFY", OP_STAMP_VERIFY),
        ("OP_STAMP_STOP", OP_STAMP_STOP),
        ("STATUS_OK", STATUS_OK),
        ("STATUS_UNKNOWN_OP", STATUS_UNKNOWN_OP),
        ("STATUS_OUT_OF_RANGE", STATUS_OUT_OF_RANGE),
        ("PANIC_BAD_INFO", PANIC_BAD_INFO),
        ("WAKE_MAILBOX", WAKE_MAILBOX),
        ("WAKE_DEVICE", WAKE_DEVICE),
        ("VSOCK_RXQ_ADDR", VSOCK_RXQ_ADDR),
        ("VSOCK_TXQ_ADDR", VSOCK_TXQ_ADDR),
        ("VSOCK_EVQ_ADDR", VSOCK_EVQ_ADDR),
        ("VQ_AVAIL_OFFSET", VQ_AVAIL_OFFSET),
        ("VQ_USED_OFFSET", VQ_USED_OFFSET),
        ("VSOCK_EV_BUFS", VSOCK_EV_BUFS),
        ("VSOCK_RX_BUFS", VSOCK_RX_BUFS),
        ("VSOCK_TX_BUFS", VSOCK_TX_BUFS),
        ("VSOCK_RX_NUM", VSOCK_RX_NUM),
        ("VSOCK_TX_NUM", VSOCK_TX_NUM),
        ("VSOCK_EV_NUM", VSOCK_EV_NUM),
        ("VSOCK_BUF_SIZE", VSOCK_BUF_SIZE),
        ("VIRTIO_MMIO_BASE", VIRTIO_MMIO_BASE),
        ("VIRTIO_MMIO_WINDOW", VIRTIO_MMIO_WINDOW),
        ("VIRTIO_MMIO_COUNT", VIRTIO_MMIO_COUNT),
        ("AGENT_PORT", AGENT_PORT),
        ("AGENT_MAX_FRAME", AGENT_MAX_FRAME),
    ]
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let source = root.join("../../guest/builtin/main.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=src/boot/builtin/abi.rs");
    println!("cargo:rerun-if-env-changed=CC");

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtin-guest.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let mut cmd = Command::new(&cc);
    cmd.args([
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffreestanding",
        "-fno-builtin",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fno-pic",
        "-mno-red-zone",
        // Integer registers only: the guest must not depend on FPU/SSE state.
        "-mgeneral-regs-only",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-e,_start",
        "-Wl,-z,max-page-size=0x1000",
        "-Wl,-z,noexecstack",
    ]);
    cmd.arg(format!("-Wl,-Ttext-segment={:#x}", abi::LOAD_ADDR));
    for (name, value) in definitions() {
        cmd.arg(format!("-D{name}={value:#x}UL"));
    }
    // What `ping` answers as its version: the VMM's, which embeds it.
    cmd.arg(format!(
        "-DGUEST_VERSION=\"{}\"",
        std::env::var("CARGO_PKG_VERSION").unwrap()
    ));
    cmd.arg("-o").arg(&out).arg(&source);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run the C compiler `{cc}` to build the built-in guest: {e}; install gcc")
    });
    assert!(
        status.success(),
        "building the built-in guest failed: see the compiler output above"
    );
}
