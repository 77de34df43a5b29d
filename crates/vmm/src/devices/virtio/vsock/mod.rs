//! virtio-vsock with its host side on Unix sockets.

mod conn;
mod device;
mod log;
pub mod packet;
mod persist;

pub use device::{Vsock, VsockError, CONN_BUF};
pub use persist::VsockState;
