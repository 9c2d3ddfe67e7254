//! Checks that a panic inside a plugin reaches Switchyard's log with its
//! message.
//!
//! This test has a binary of its own on purpose. `tracing` decides once per
//! log call site, process-wide, whether anyone listens, and a scoped
//! subscriber does not undo that decision. In a binary with other tests, one
//! that traps the plugin first, on a thread with no subscriber, can mark the
//! plugin's log call site as unheard, and this test then sees nothing.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly"
)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use switchyard_policy::{Endpoint, Policy, PolicySettings, RouteRequest};

#[test]
fn plugin_panic_message_is_logged_at_error() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-unknown-unknown/release/test_faults.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `make plugins` first",
        path.display()
    );
    let policy = Policy::load(&PolicySettings::new(path)).unwrap();

    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let request = Arc::new(RouteRequest::new(Endpoint::ChatCompletions, "trap"));
    let err = tracing::subscriber::with_default(subscriber, || policy.route(&request).unwrap_err());
    assert_eq!(err.kind(), "trap");

    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("test-faults was asked to trap"))
        .unwrap_or_else(|| panic!("panic message not logged:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("switchyard::plugin"), "{line}");
    assert!(line.contains("plugin=\"test_faults\""), "{line}");
}

/// A `tracing_subscriber` writer that keeps everything written to it.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
