//! forkd: the command-line client of forkd-daemon.

fn main() {}
