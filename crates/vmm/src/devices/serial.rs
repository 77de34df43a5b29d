//! The 8250/16550 UART console at COM1, built on [`vm_superio::Serial`].
//!
//! The guest's transmitted bytes go to a [`Write`] target chosen with
//! [`ConsoleOutput`]; the UART's interrupt line is an [`EventFd`] that the VM
//! registers as an irqfd on GSI [`COM1_IRQ`], so the in-kernel irqchip raises
//! the interrupt without a trip through the VMM.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports COM1 decodes.
pub const COM1_LEN: u64 = 8;
/// The interrupt line (ISA IRQ / GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Errors from setting up or feeding the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The console output file could not be opened.
    #[error("cannot open console output file {path}: {source}")]
    OpenOutput {
        /// The file we tried to open.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The receive FIFO has no room for all of the input.
    #[error("serial receive FIFO is full: {len} input bytes do not fit in the {free} free bytes")]
    InputFifoFull {
        /// How many bytes were offered.
        len: usize,
        /// How many bytes the FIFO could still take.
        free: usize,
    },
    /// Signalling the serial interrupt failed.
    #[error("cannot signal the serial interrupt eventfd: {0}")]
    Interrupt(io::Error),
    /// Any other failure reported by the UART model.
    #[error("serial device error: {0}")]
    Device(String),
}

/// A [`Trigger`] that raises an interrupt by writing 1 to an [`EventFd`]
/// (registered by the VM as an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; every trigger writes 1 to it.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// A second trigger signalling the same eventfd (a `dup` of its fd).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created if missing and appended to.
    File(PathBuf),
    /// Nowhere: output is discarded.
    Sink,
}

impl ConsoleOutput {
    /// Opens the writer for this target.
    ///
    /// None of the writers hold bytes back: the UART flushes after every
    /// byte, `Stdout` is at most line-buffered and flushed on each flush, and
    /// the file is an unbuffered [`std::fs::File`]. A console log is therefore
    /// complete up to the last byte even if the VM is killed.
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialError> {
        Ok(match self {
            ConsoleOutput::Stdout => Box::new(io::stdout()),
            ConsoleOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SerialError::OpenOutput {
                        path: path.clone(),
                        source,
                    })?,
            ),
            ConsoleOutput::Sink => Box::new(io::sink()),
        })
    }
}

/// The UART's snapshot state (vm-superio's `SerialState`, made serialisable).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO contents.
    pub in_buffer: Vec<u8>,
}

/// The UART model this console is built on.
type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// The COM1 console: a 16550A UART on the port-I/O bus.
///
/// Insert it at [`COM1_BASE`] with length [`COM1_LEN`]. Only single-byte
/// accesses do anything (which is all a UART driver uses); wider reads return
/// zeros and wider writes are ignored.
pub struct SerialConsole {
    uart: Uart,
}

impl crate::devices::persist::Persist for SerialConsole {
    type State = SerialConsoleState;
    /// The interrupt line and where the guest's output goes.
    type RestoreArgs = (EventFd, Box<dyn Write + Send>);
    type Error = SerialError;

    /// The UART's registers and receive FIFO, for a snapshot.
    fn save(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART restored from `state` (untrusted: an over-full FIFO is refused).
    fn restore(
        state: &SerialConsoleState,
        (interrupt, out): (EventFd, Box<dyn Write + Send>),
    ) -> Result<Self, SerialError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, EventFdTrigger::new(interrupt), NoEvents, out)
            .map_err(|e| SerialError::Device(format!("cannot restore the UART: {e}")))?;
        Ok(Self { uart })
    }
}

impl SerialConsole {
    /// A UART writing the guest's output to `out` and signalling `interrupt`
    /// when it raises its interrupt line.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(interrupt), out),
        }
    }

    /// Queues `bytes` for the guest to read, raising the receive interrupt
    /// if the guest enabled it.
    ///
    /// Either all of `bytes` are queued or none: when the receive FIFO has
    /// not enough room, nothing is queued and [`SerialError::InputFifoFull`]
    /// says how much would fit. While the guest has the UART in loopback
    /// mode, input is dropped (as on real hardware).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<(), SerialError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let free = self.uart.fifo_capacity();
        if bytes.len() > free {
            return Err(SerialError::InputFifoFull {
                len: bytes.len(),
                free,
            });
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(_) => Ok(()),
            Err(vm_superio::serial::Error::Trigger(e)) => Err(SerialError::Interrupt(e)),
            Err(vm_superio::serial::Error::FullFifo) => Err(SerialError::InputFifoFull {
                len: bytes.len(),
                free: self.uart.fifo_capacity(),
            }),
            Err(e) => Err(SerialError::Device(e.to_string())),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(reg)) if offset < COM1_LEN => *byte = self.uart.read(reg),
            (data, _) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(reg)) = (data, u8::try_from(offset)) {
            if offset < COM1_LEN {
                // There is nobody to report a failed write to: the guest
                // cannot be blocked, and the UART still raises its
                // THR-empty interrupt, so the byte is simply lost.
                let _ = self.uart.write(reg, *value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Register offsets and bits used by the tests.
    const THR: u64 = 0;
    const RBR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const IER_THR_EMPTY: u8 = 1 << 1;
    const LSR_DATA_READY: u8 = 1 << 0;
    const LSR_THR_EMPTY: u8 = 1 << 5;

    /// A writer appending to a shared buffer the test can inspect.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, SharedBuf, EventFd) {
        let buf = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let console = SerialConsole::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        (console, buf, irq)
    }

    fn read_reg(console: &mut SerialConsole, offset: u64) -> u8 {
        let mut data = [0xaa];
        console.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut console, buf, _irq) = console();
        for &b in b"hello\n" {
            console.write(THR, &[b]);
        }
        assert_eq!(buf.0.lock().unwrap().as_slice(), b"hello\n");
    }

    #[test]
    fn thr_empty_interrupt_signals_the_eventfd() {
        let (mut console, _buf, irq) = console();
        // Nothing enabled yet: a byte does not interrupt.
        console.write(THR, b"a");
        assert!(irq.read().is_err(), "interrupt raised while disabled");

        console.write(IER, &[IER_THR_EMPTY]);
        // Reading IIR acknowledges the interrupt raised by enabling it.
        let _ = irq.read();
        read_reg(&mut console, 2);
        console.write(THR, b"b");
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn line_status_shows_transmitter_empty() {
        let (mut console, _buf, _irq) = console();
        let lsr = read_reg(&mut console, LSR);
        assert_eq!(lsr & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert_eq!(lsr & LSR_DATA_READY, 0);
        console.write(THR, b"x");
        assert_eq!(read_reg(&mut console, LSR) & LSR_THR_EMPTY, LSR_THR_EMPTY);
    }

    #[test]
    fn enqueued_input_is_read_back_with_data_ready() {
        let (mut console, _buf, _irq) = console();
        console.enqueue_input(b"ok").unwrap();
        assert_ne!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut console, RBR), b'o');
        assert_ne!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut console, RBR), b'k');
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_that_does_not_fit_is_refused_whole() {
        let (mut console, _buf, _irq) = console();
        let free = console.uart.fifo_capacity();
        let too_much = vec![b'z'; free + 1];
        let err = console.enqueue_input(&too_much).unwrap_err();
        assert!(
            matches!(err, SerialError::InputFifoFull { len, free: f } if len == free + 1 && f == free)
        );
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
        console.enqueue_input(&too_much[1..]).unwrap();
        assert!(console.enqueue_input(b"!").is_err());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut console, buf, _irq) = console();
        let mut wide = [0xaa; 4];
        console.read(LSR, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut empty = [];
        console.read(0, &mut empty);
        console.write(THR, b"ab");
        console.write(THR, &[]);
        let mut out_of_range = [0xaa];
        console.read(8, &mut out_of_range);
        assert_eq!(out_of_range, [0]);
        console.write(0x1_0000, b"c");
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn file_output_appends_and_names_the_path_on_error() {
        let dir = std::env::temp_dir().join(format!("forkd-serial-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        {
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let out = ConsoleOutput::File(path.clone()).open().unwrap();
            let mut console = SerialConsole::new(irq, out);
            console.write(THR, b"n");
            // Visible before the console is dropped: nothing is buffered.
            assert_eq!(std::fs::read(&path).unwrap(), b"old\nn");
        }

        let missing = dir.join("no-such-dir").join("console.log");
        let err = ConsoleOutput::File(missing.clone()).open().err().unwrap();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(ConsoleOutput::Sink.open().is_ok());
        assert!(ConsoleOutput::Stdout.open().is_ok());
    }

    #[test]
    fn trigger_clone_signals_the_same_eventfd() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger = EventFdTrigger::new(irq.try_clone().unwrap());
        let clone = trigger.try_clone().unwrap();
        trigger.trigger().unwrap();
        clone.trigger().unwrap();
        assert_eq!(irq.read().unwrap(), 2);
    }
}
