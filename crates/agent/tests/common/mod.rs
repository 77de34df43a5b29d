//! forkd-agent as a normal process on a Unix socket, for the tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_client::{Client, Target};

/// A running agent, killed (and its directory removed) on drop.
pub struct Agent {
    /// Its process.
    pub child: Child,
    /// A directory of its own.
    pub dir: PathBuf,
    /// Its socket.
    pub sock: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Starts forkd-agent with `extra` arguments and waits until it answers.
pub fn agent(extra: &[&str]) -> Agent {
    let dir = std::env::temp_dir().join(format!(
        "forkd-agent-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_forkd-agent"))
        .arg("--unix")
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let a = Agent { child, dir, sock };
    let c = a.client();
    let start = Instant::now();
    while c.ping().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "agent did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a
}

impl Agent {
    /// A client of it.
    pub fn client(&self) -> Client {
        Client::new(Target::Unix(self.sock.clone()))
    }
}
