//! The log writer: formatted lines go to stderr from a thread of their own through a bounded
//! queue, so no request waits for stderr (a pipe to a slow collector, a terminal, a full disk).
//!
//! The per-request lines of requests without a principal (target `berth::request`) are the only
//! lines ever dropped: when the queue is full they are counted in `berth_log_dropped_total`
//! instead. Every other line waits for room: warnings, start-up, and, in the policy mode, the
//! request lines that carry a principal, which record each allow or deny decision (an audit
//! trail). One queue for both keeps the lines in order. A line that waits on a worker of the
//! multi-thread runtime waits in `block_in_place`, so a stuck stderr holds the requests whose
//! lines wait, not the other tasks of their worker; the exit flush gives up after `FLUSH_WAIT`
//! in all. What the lines say and their format is `tracing_subscriber`'s and `api::record`'s
//! business, not this file's.
//!
//! The request lines skip `tracing`'s formatting once `take_request_lines` was called (the
//! `serve` command does): `api::record` writes each by hand, in the layout `tracing` would
//! use, and queues it with `send_request_line`. At tens of thousands of requests a second,
//! tracing's field visitors cost a fifth of the throughput.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::IntCounter;
use tracing_subscriber::fmt::MakeWriter;

/// The target of request lines that may be dropped under load (no principal, no decision).
pub const REQUEST_TARGET: &str = "berth::request";

/// Lines waiting for stderr: at about 300 bytes a line, 5 MiB at most, a few tenths of a
/// second of the highest request rate.
pub const QUEUE_LINES: usize = 16 * 1024;

/// The layouts of `tracing_subscriber::fmt` that the hand-written request lines follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Text,
    Json,
}

/// Where hand-written request lines go; unset (tests that install their own subscriber),
/// request lines go through `tracing`.
static REQUEST_LINES: OnceLock<(Logs, Layout)> = OnceLock::new();

/// Queues the request line `write` lays out: dropped when the queue is full if `lossy`, else
/// waits for room, as `Line` does. `false`: nothing took request lines; log through `tracing`.
pub fn send_request_line(lossy: bool, write: impl FnOnce(&mut Vec<u8>, Layout)) -> bool {
    let Some((logs, layout)) = REQUEST_LINES.get() else {
        return false;
    };
    // Written straight into the message: one allocation, no copy.
    let mut line = Vec::with_capacity(512);
    write(&mut line, *layout);
    logs.queue_line(line, lossy);
    true
}

/// How long the writer lets lines gather after each burst: the most a line waits for stderr
/// when lines come faster than one per this; the queue holds far more than arrive meanwhile.
const GATHER: Duration = Duration::from_millis(10);

/// How long `Flush` waits, in all, for room in the queue and for the queue to drain at exit.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How often `Flush` tries again to queue its marker while the queue is full.
const FLUSH_RETRY: Duration = Duration::from_millis(10);

enum Message {
    Line(Vec<u8>),
    /// Answers once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// The process-wide count of dropped lines, registered by `Metrics`.
pub fn dropped_lines() -> &'static IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        IntCounter::new(
            "berth_log_dropped_total",
            "Request log lines dropped because the log queue was full",
        )
        .expect("valid metric")
    })
}

/// A `MakeWriter` for `tracing_subscriber::fmt` that queues each line for the writer thread.
#[derive(Clone)]
pub struct Logs {
    queue: SyncSender<Message>,
    dropped: IntCounter,
}

/// Waits, when dropped, for the lines queued so far to be written (the end of `main`).
pub struct Flush(Logs);

impl Logs {
    /// Lines to stderr, drops counted in `dropped_lines()`.
    pub fn stderr() -> (Logs, Flush) {
        Logs::start(QUEUE_LINES, std::io::stderr(), dropped_lines().clone())
    }

    /// Lines to `sink` through a queue of `capacity` lines.
    pub fn start(
        capacity: usize,
        sink: impl Write + Send + 'static,
        dropped: IntCounter,
    ) -> (Logs, Flush) {
        let (queue, lines) = mpsc::sync_channel(capacity);
        std::thread::Builder::new()
            .name("berth-log".into())
            .spawn(move || write_lines(lines, sink))
            .expect("spawn the log writer thread");
        let logs = Logs { queue, dropped };
        (logs.clone(), Flush(logs))
    }

    /// Sends request lines written by hand (`send_request_line`) here, laid out as `layout`.
    /// Only for a writer with plain lines: the first call wins.
    pub fn take_request_lines(&self, layout: Layout) {
        let _ = REQUEST_LINES.set((self.clone(), layout));
    }

    fn queue_line(&self, line: Vec<u8>, lossy: bool) {
        match self.queue.try_send(Message::Line(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) if lossy => self.dropped.inc(),
            Err(TrySendError::Full(message)) => wait_for_room(&self.queue, message),
        }
    }
}

/// Queues a line that is never dropped, waiting for room. On a thread of tokio's multi-thread
/// runtime the wait is in `block_in_place`: the worker hands its other tasks to another thread
/// first, so requests whose lines are dropped, or not logged, go on while stderr is stuck.
/// Elsewhere (a plain thread, the blocking pool, a current-thread runtime, whose only thread
/// cannot hand over) the thread just waits.
fn wait_for_room(queue: &SyncSender<Message>, message: Message) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    let send = || {
        let _ = queue.send(message);
    };
    match multi_thread {
        true => tokio::task::block_in_place(send),
        false => send(),
    }
}

fn write_lines(lines: Receiver<Message>, sink: impl Write) {
    let mut sink = std::io::BufWriter::with_capacity(64 * 1024, sink);
    while let Ok(message) = lines.recv() {
        let mut next = Some(message);
        // Write what is queued, then flush once: one write(2) per burst, not per line.
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    let _ = sink.write_all(&line);
                }
                Message::Flush(done) => {
                    let _ = sink.flush();
                    let _ = done.send(());
                }
            }
            next = lines.try_recv().ok();
        }
        let _ = sink.flush();
        // Let lines gather before the next burst: a sender wakes this thread (a futex call,
        // then a context switch and a write) only when it waits in `recv`, so at tens of
        // thousands of lines a second a wake per line cost more than formatting them.
        std::thread::sleep(GATHER);
    }
}

impl Drop for Flush {
    /// Bounded by `FLUSH_WAIT` in all: a sink stuck with the queue full must not hold the exit.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + FLUSH_WAIT;
        let (done, wait) = mpsc::sync_channel(1);
        let mut marker = Message::Flush(done);
        loop {
            match self.0.queue.try_send(marker) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return;
                    }
                    marker = back;
                    std::thread::sleep(FLUSH_RETRY);
                }
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// The writer of one event: `tracing_subscriber::fmt` formats a whole line, then writes it once.
pub struct Line {
    logs: Logs,
    lossy: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.logs.queue_line(buf.to_vec(), self.lossy);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            logs: self.clone(),
            lossy: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            logs: self.clone(),
            lossy: meta.target() == REQUEST_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that holds its first write until the test lets it go, then records everything.
    #[derive(Clone)]
    struct Gate {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
        /// Set once the writer thread waits in the sink.
        stuck: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Gate {
        fn closed() -> Gate {
            Gate {
                open: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
                written: Arc::default(),
                stuck: Arc::default(),
            }
        }

        /// Waits (bounded) until the writer thread is stuck in a write.
        fn wait_stuck(&self) {
            for _ in 0..6000 {
                if self.stuck.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the writer never wrote");
        }

        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }

        fn lines(&self) -> Vec<String> {
            let written = self.written.lock().unwrap();
            String::from_utf8_lossy(&written)
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, changed) = &*self.open;
            let mut guard = open.lock().unwrap();
            if !*guard {
                self.stuck.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            while !*guard {
                guard = changed.wait(guard).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Lines this long let the writer thread hold at most two (its 64 KiB buffer, and one in
    /// hand) while the sink is stuck, so the queue's bound decides what is dropped.
    fn padded(text: &str) -> String {
        format!("{text} {}\n", "x".repeat(40 * 1024))
    }

    fn line(logs: &Logs, lossy: bool, text: &str) {
        let mut writer = Line {
            logs: logs.clone(),
            lossy,
        };
        writer.write_all(padded(text).as_bytes()).unwrap();
    }

    #[test]
    fn request_lines_that_find_the_queue_full_are_dropped_and_counted() {
        let gate = Gate::closed();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (logs, flush) = Logs::start(4, gate.clone(), dropped.clone());
        for i in 0..1000 {
            line(&logs, true, &format!("request {i}"));
        }
        assert!(dropped.get() >= 1000 - 4 - 2, "dropped {}", dropped.get());
        gate.open();
        drop(flush);
        let written = gate.lines().len() as u64;
        assert_eq!(written + dropped.get(), 1000);
    }

    #[test]
    fn audit_lines_wait_for_room_and_are_never_dropped() {
        let gate = Gate::closed();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (logs, flush) = Logs::start(2, gate.clone(), dropped.clone());
        let (started, first_lines) = mpsc::channel();
        let writer = {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    line(&logs, false, &format!("decision {i}"));
                    line(&logs, true, &format!("request {i}"));
                    let _ = started.send(());
                }
            })
        };
        // The sink stays stuck until the writer has filled the queue; its next decision line
        // then waits for room instead of being dropped.
        first_lines.recv().unwrap();
        first_lines.recv().unwrap();
        gate.open();
        writer.join().unwrap();
        drop(flush);
        let lines = gate.lines();
        let decisions: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("decision ")?.split(' ').next())
            .collect();
        let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert_eq!(decisions, expected);
        let requests = lines.iter().filter(|l| l.starts_with("request")).count();
        assert_eq!(requests as u64 + dropped.get(), 100);
    }

    #[test]
    fn decision_lines_waiting_for_room_do_not_hold_the_worker_other_requests_run_on() {
        let gate = Gate::closed();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (logs, flush) = Logs::start(2, gate.clone(), dropped.clone());
        // One worker: without a hand-over, a task waiting for room holds every other task.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (queued, lines_queued) = mpsc::channel();
        let deciding = {
            let logs = logs.clone();
            // No await in here: the worker can run another task only if this one hands over.
            runtime.spawn(async move {
                for i in 0..20 {
                    line(&logs, false, &format!("decision {i}"));
                    let _ = queued.send(());
                }
            })
        };
        // The sink holds one or two lines and the queue two more: of 20, one soon waits.
        for _ in 0..2 {
            lines_queued.recv().unwrap();
        }
        let (answered, answer) = mpsc::channel();
        let other = logs.clone();
        runtime.spawn(async move {
            // Queued, or dropped when the queue is full: never waited for.
            line(&other, true, "request of another client");
            let _ = answered.send(());
        });
        let ran = answer.recv_timeout(Duration::from_secs(60));
        // Opened before judging, so a failure ends the test instead of the runtime's drop
        // waiting forever on a worker stuck in the sink.
        gate.open();
        assert!(
            ran.is_ok(),
            "another request ran while decision lines waited for room"
        );
        runtime.block_on(deciding).unwrap();
        drop(flush);
        let decisions: Vec<String> = gate
            .lines()
            .iter()
            .filter_map(|l| Some(l.strip_prefix("decision ")?.split(' ').next()?.to_owned()))
            .collect();
        let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(decisions, expected, "every decision line, in order");
    }

    #[test]
    fn the_exit_flush_gives_up_on_a_stuck_sink_with_the_queue_full() {
        let gate = Gate::closed();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (logs, flush) = Logs::start(2, gate.clone(), dropped.clone());
        line(&logs, true, "request 0");
        gate.wait_stuck();
        for i in 1..10 {
            line(&logs, true, &format!("request {i}"));
        }
        assert!(dropped.get() >= 1, "the queue is full");
        let (done, flushed) = mpsc::channel();
        std::thread::spawn(move || {
            drop(flush);
            let _ = done.send(());
        });
        flushed
            .recv_timeout(Duration::from_secs(60))
            .expect("the exit flush returned");
        gate.open();
    }

    #[test]
    fn events_of_the_request_target_are_the_lossy_ones() {
        let gate = Gate::closed();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (logs, flush) = Logs::start(4, gate.clone(), dropped.clone());
        let pad = "x".repeat(40 * 1024);
        let subscriber = tracing_subscriber::fmt().with_writer(logs).finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                tracing::info!(target: REQUEST_TARGET, pad = %pad, "request");
            }
        });
        assert!(dropped.get() >= 100 - 4 - 2, "dropped {}", dropped.get());
        gate.open();
        drop(flush);
        assert_eq!(gate.lines().len() as u64 + dropped.get(), 100);
    }
}
