//! The imports a plugin is linked against: our `host` interface and a
//! sandboxed subset of WASI 0.2.
//!
//! Owns what a plugin can reach. Plugins get clocks, randomness, an empty
//! environment, closed stdin, discarded stdout/stderr and no preopened
//! directories. Sockets are not linked at all, so a plugin that imports
//! them (or anything else not listed here) fails to load.
//!
//! wasmtime-wasi's synchronous `wasi:io` bindings run blocking operations
//! with `Handle::block_on` on the ambient tokio runtime, which panics when
//! called from a runtime worker thread, and `Policy::route` is called from
//! exactly there. So `wasi:io/streams` and `wasi:io/poll` are linked here
//! with [`NonBlockingIo`], which completes an operation only if it is ready
//! at once and traps otherwise. With sink and closed streams everything is
//! ready at once; a plugin that sleeps or waits traps instead of blocking a
//! proxy thread.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::ResourceTable;
use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::io as async_io;
use wasmtime_wasi::p2::bindings::sync::filesystem::types as sync_fs_types;
use wasmtime_wasi::p2::bindings::sync::io as sync_io;
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

use crate::bindings;
use crate::state::HostState;

/// Message of the trap raised when a plugin would block.
const WOULD_BLOCK: &str = "plugin would block: a wasi:io operation was not ready";

/// Builds the linker every plugin instance is created from.
//
// `Linker::define_unknown_imports_as_traps` would let plugins that import
// sockets load, but it defines stubs under the exact versions the plugin
// imports (`wasi:cli/stdout@0.2.6`), which then shadow the
// semver-compatible real ones (`@0.2.12`): every WASI call would trap.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    let l = &mut linker;

    bindings::add_to_linker(l)?;

    let clock = HostState::clocks;
    let rand = HostState::random;
    let cli_view = HostState::cli;
    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, clock)?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, clock)?;
    random::random::add_to_linker::<_, WasiRandom>(l, rand)?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, rand)?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(l, rand)?;
    cli::exit::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::environment::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, cli_view)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, cli_view)?;

    // Plugins that touch `std::fs` import the filesystem interfaces. With
    // no preopens they can never hold a descriptor, so the blocking
    // descriptor methods (which would hit the tokio problem) are
    // unreachable.
    let fs = HostState::filesystem;
    filesystem::preopens::add_to_linker::<_, WasiFilesystem>(l, fs)?;
    sync_fs_types::add_to_linker::<_, WasiFilesystem>(l, fs)?;

    async_io::error::add_to_linker::<_, TableIo>(l, HostState::table)?;
    sync_io::streams::add_to_linker::<_, NonBlockingIo>(l, table)?;
    sync_io::poll::add_to_linker::<_, NonBlockingIo>(l, table)?;

    Ok(linker)
}

fn table(state: &mut HostState) -> NonBlockingTable<'_> {
    NonBlockingTable(state.table())
}

/// `HasData` marker for `wasi:io/error`, which never blocks.
struct TableIo;

impl HasData for TableIo {
    type Data<'a> = &'a mut ResourceTable;
}

/// `HasData` marker for the non-blocking `wasi:io` implementation.
struct NonBlockingIo;

impl HasData for NonBlockingIo {
    type Data<'a> = NonBlockingTable<'a>;
}

/// The resource table, seen through `wasi:io` operations that never block.
struct NonBlockingTable<'a>(&'a mut ResourceTable);

/// Polls `future` once; `None` if it is not ready.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

fn would_block() -> wasmtime::Error {
    wasmtime::format_err!("{WOULD_BLOCK}")
}

/// Result of `future` if ready at once, else a trap.
fn now_or_trap<T, F>(future: F) -> wasmtime::Result<T>
where
    F: Future<Output = wasmtime::Result<T>>,
{
    ready_now(future).unwrap_or_else(|| Err(would_block()))
}

/// Result of a stream operation if ready at once, else a trap.
fn stream_now_or_trap<T, F>(future: F) -> StreamResult<T>
where
    F: Future<Output = StreamResult<T>>,
{
    ready_now(future).unwrap_or_else(|| Err(StreamError::Trap(would_block())))
}

// Short names for the resources in the signatures below.
type Output = Resource<DynOutputStream>;
type Input = Resource<DynInputStream>;
type Pollable = Resource<DynPollable>;

// Each method either delegates to wasmtime-wasi's own non-blocking
// implementation on the table (`Sync::`) or runs its async one once
// (`Async::`), trapping if it is not ready.

impl sync_io::streams::Host for NonBlockingTable<'_> {
    fn convert_stream_error(
        &mut self,
        err: StreamError,
    ) -> wasmtime::Result<sync_io::streams::StreamError> {
        sync_io::streams::Host::convert_stream_error(self.0, err)
    }
}

impl sync_io::streams::HostOutputStream for NonBlockingTable<'_> {
    fn drop(&mut self, stream: Output) -> wasmtime::Result<()> {
        use async_io::streams::HostOutputStream as Async;
        now_or_trap(Async::drop(self.0, stream))
    }

    fn check_write(&mut self, stream: Output) -> StreamResult<u64> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Output, bytes: Vec<u8>) -> StreamResult<()> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: Output, bytes: Vec<u8>) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        let table = &mut *self.0;
        stream_now_or_trap(Async::blocking_write_and_flush(table, stream, bytes))
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: Output, len: u64) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        let table = &mut *self.0;
        let write = Async::blocking_write_zeroes_and_flush(table, stream, len);
        stream_now_or_trap(write)
    }

    fn subscribe(&mut self, stream: Output) -> wasmtime::Result<Pollable> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Output, len: u64) -> StreamResult<()> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Output) -> StreamResult<()> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Output) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_flush(self.0, stream))
    }

    fn splice(&mut self, dst: Output, src: Input, len: u64) -> StreamResult<u64> {
        use sync_io::streams::HostOutputStream as Sync;
        Sync::splice(self.0, dst, src, len)
    }

    fn blocking_splice(&mut self, dst: Output, src: Input, len: u64) -> StreamResult<u64> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_splice(self.0, dst, src, len))
    }
}

impl sync_io::streams::HostInputStream for NonBlockingTable<'_> {
    fn drop(&mut self, stream: Input) -> wasmtime::Result<()> {
        use async_io::streams::HostInputStream as Async;
        now_or_trap(Async::drop(self.0, stream))
    }

    fn read(&mut self, stream: Input, len: u64) -> StreamResult<Vec<u8>> {
        use sync_io::streams::HostInputStream as Sync;
        Sync::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Input, len: u64) -> StreamResult<Vec<u8>> {
        use async_io::streams::HostInputStream as Async;
        stream_now_or_trap(Async::blocking_read(self.0, stream, len))
    }

    fn skip(&mut self, stream: Input, len: u64) -> StreamResult<u64> {
        use sync_io::streams::HostInputStream as Sync;
        Sync::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Input, len: u64) -> StreamResult<u64> {
        use async_io::streams::HostInputStream as Async;
        stream_now_or_trap(Async::blocking_skip(self.0, stream, len))
    }

    fn subscribe(&mut self, stream: Input) -> wasmtime::Result<Pollable> {
        use sync_io::streams::HostInputStream as Sync;
        Sync::subscribe(self.0, stream)
    }
}

impl sync_io::poll::Host for NonBlockingTable<'_> {
    fn poll(&mut self, pollables: Vec<Pollable>) -> wasmtime::Result<Vec<u32>> {
        use async_io::poll::Host as Async;
        now_or_trap(Async::poll(self.0, pollables))
    }
}

impl sync_io::poll::HostPollable for NonBlockingTable<'_> {
    fn ready(&mut self, pollable: Pollable) -> wasmtime::Result<bool> {
        // `ready` only asks; an unready pollable is an answer, not a block.
        use async_io::poll::HostPollable as Async;
        ready_now(Async::ready(self.0, pollable)).unwrap_or(Ok(false))
    }

    fn block(&mut self, pollable: Pollable) -> wasmtime::Result<()> {
        use async_io::poll::HostPollable as Async;
        now_or_trap(Async::block(self.0, pollable))
    }

    fn drop(&mut self, pollable: Pollable) -> wasmtime::Result<()> {
        use sync_io::poll::HostPollable as Sync;
        Sync::drop(self.0, pollable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_now_returns_ready_values_and_none_for_pending() {
        assert_eq!(ready_now(async { 7 }), Some(7));
        assert_eq!(ready_now(std::future::pending::<u8>()), None);
    }
}
