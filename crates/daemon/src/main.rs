//! forkd-daemon: serves the forkd v1 REST API.

fn main() {}
