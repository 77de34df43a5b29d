//! A minimal i8042 PS/2 controller, whose one real job is the reset line.
//!
//! Linux booted with `reboot=k` reboots (and, in a VM without ACPI, powers
//! off) by sending command `0xFE` ("pulse reset line") to port `0x64`. This
//! model turns that command into a write on an [`EventFd`], on which the VMM
//! ends the VM cleanly.
//!
//! Everything else is the least needed for the kernel's probe to find an idle
//! controller with no keyboard or mouse behind it:
//!
//! | port   | offset | read                         | write                   |
//! |--------|--------|------------------------------|-------------------------|
//! | `0x60` | 0      | pending output byte, else 0  | data (see `0x60` below) |
//! | `0x64` | 4      | status register              | command                 |
//! | `0x61`..`0x63` | 1..=3 | 0                     | ignored                 |
//!
//! Commands: `0x20` queues the command byte for the next data read, `0x60`
//! makes the next data write the new command byte, `0xFE` signals reset; all
//! others are accepted and ignored (no response byte is produced). Data
//! writes that are not a command-byte write (bytes meant for the keyboard)
//! are ignored. No interrupt is ever raised.

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// First I/O port of the i8042 (the data port).
pub const I8042_BASE: u16 = 0x60;
/// Number of I/O ports the i8042 decodes (`0x60..=0x64`).
pub const I8042_LEN: u64 = 5;

/// Offset of the data port (`0x60`).
const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (`0x64`).
const COMMAND_OFFSET: u64 = 4;

/// Command: read the controller command byte.
const CMD_READ_CTR: u8 = 0x20;
/// Command: write the controller command byte (value follows on the data port).
const CMD_WRITE_CTR: u8 = 0x60;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Status: the output buffer holds a byte for the host to read.
const SB_OUT_FULL: u8 = 1 << 0;
/// Status: system flag, set once the controller passed its self-test.
const SB_SYSTEM_FLAG: u8 = 1 << 2;
/// Status: the last byte written went to the command port (not the data port).
const SB_LAST_WAS_COMMAND: u8 = 1 << 3;

/// Command byte at power-on: keyboard interrupt enabled, system flag set,
/// scancode translation on (what PC firmware typically leaves behind).
const DEFAULT_COMMAND_BYTE: u8 = 0x45;

/// The i8042 controller. Insert it on the port-I/O bus at [`I8042_BASE`]
/// with length [`I8042_LEN`].
#[derive(Debug)]
pub struct I8042 {
    /// Written with 1 when the guest asks for a CPU reset.
    reset: EventFd,
    /// The controller command byte (`0x20` reads it, `0x60` writes it).
    command_byte: u8,
    /// The byte the next data-port read returns, if any.
    output: Option<u8>,
    /// Set after command `0x60`: the next data-port write is the command byte.
    awaiting_command_byte: bool,
    /// Whether the last byte written went to the command port.
    last_was_command: bool,
}

/// The controller's snapshot state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The command byte.
    pub command_byte: u8,
    /// The pending output byte.
    pub output: Option<u8>,
    /// Waiting for a command byte on the data port.
    pub awaiting_command_byte: bool,
    /// The last write went to the command port.
    pub last_was_command: bool,
}

impl crate::devices::persist::Persist for I8042 {
    type State = I8042State;
    /// The reset line (an eventfd the VM watches).
    type RestoreArgs = EventFd;
    type Error = std::convert::Infallible;

    /// The controller's state, for a snapshot.
    fn save(&self) -> I8042State {
        I8042State {
            command_byte: self.command_byte,
            output: self.output,
            awaiting_command_byte: self.awaiting_command_byte,
            last_was_command: self.last_was_command,
        }
    }

    /// A controller restored from `state`.
    fn restore(state: &I8042State, reset: EventFd) -> Result<Self, std::convert::Infallible> {
        Ok(Self {
            reset,
            command_byte: state.command_byte,
            output: state.output,
            awaiting_command_byte: state.awaiting_command_byte,
            last_was_command: state.last_was_command,
        })
    }
}

impl I8042 {
    /// A controller that writes 1 to `reset` when the guest resets the CPU.
    pub fn new(reset: EventFd) -> Self {
        Self {
            reset,
            command_byte: DEFAULT_COMMAND_BYTE,
            output: None,
            awaiting_command_byte: false,
            last_was_command: false,
        }
    }

    /// The status register: output-buffer-full only while a byte is pending;
    /// the input buffer is always empty (commands complete immediately).
    fn status(&self) -> u8 {
        let mut status = SB_SYSTEM_FLAG;
        if self.output.is_some() {
            status |= SB_OUT_FULL;
        }
        if self.last_was_command {
            status |= SB_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        // A new command abandons a pending command-byte write.
        self.awaiting_command_byte = false;
        match cmd {
            CMD_READ_CTR => self.output = Some(self.command_byte),
            CMD_WRITE_CTR => self.awaiting_command_byte = true,
            CMD_RESET_CPU => {
                // The write only fails if the counter would overflow, i.e.
                // a reset is already pending many times over: nothing to add.
                let _ = self.reset.write(1);
            }
            _ => {}
        }
    }

    fn data_write(&mut self, value: u8) {
        self.last_was_command = false;
        if std::mem::take(&mut self.awaiting_command_byte) {
            self.command_byte = value;
        }
        // Otherwise the byte is for the keyboard, which is not there.
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.output.take().unwrap_or(0),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, [value]) => self.data_write(*value),
            (COMMAND_OFFSET, [cmd]) => self.command(*cmd),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(reset.try_clone().unwrap()), reset)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0xaa];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn reset_command_signals_the_eventfd() {
        let (mut dev, reset) = i8042();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_and_writes_do_not_reset() {
        let (mut dev, reset) = i8042();
        for cmd in [0x20, 0x60, 0xa7, 0xa8, 0xaa, 0xad, 0xae, 0xd4, 0xff] {
            dev.write(COMMAND_OFFSET, &[cmd]);
        }
        // 0xFE on the data port, at another offset, or in a wide write.
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(1, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert!(
            reset.read().is_err(),
            "reset signalled by a non-reset access"
        );
    }

    #[test]
    fn command_byte_roundtrip() {
        let (mut dev, _reset) = i8042();
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), DEFAULT_COMMAND_BYTE);

        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x30]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x30);

        // Only the one write after 0x60 is taken as the command byte.
        dev.write(DATA_OFFSET, &[0x11]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x30);
    }

    #[test]
    fn status_shows_output_full_only_while_a_byte_is_pending() {
        let (mut dev, _reset) = i8042();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);

        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        // Reading the status does not consume the byte.
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        read(&mut dev, DATA_OFFSET);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn unknown_ports_and_wide_reads_are_zero() {
        let (mut dev, _reset) = i8042();
        for offset in 1..=3 {
            assert_eq!(read(&mut dev, offset), 0);
        }
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let mut wide = [0xaa; 2];
        dev.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0, 0]);
        // The wide read did not consume the pending byte.
        assert_eq!(read(&mut dev, DATA_OFFSET), DEFAULT_COMMAND_BYTE);
        let mut empty = [];
        dev.read(DATA_OFFSET, &mut empty);
    }
}
