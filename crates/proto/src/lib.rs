//! Types shared across forkd processes.
