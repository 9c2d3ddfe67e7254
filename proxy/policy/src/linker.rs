//! The imports a plugin is linked against: our `host` interface and a
//! sandboxed subset of WASI 0.2.
//!
//! Owns what a plugin can reach. Plugins get clocks, randomness, an empty
//! environment, closed stdin, discarded stdout/stderr and no preopened
//! directories. Sockets are not linked at all; any import the host does
//! not provide traps when called.
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

use wasmtime::component::{Component, HasData, HasSelf, Linker, Resource};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::io as async_io;
use wasmtime_wasi::p2::bindings::sync::io as sync_io;
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, StreamError, StreamResult,
};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

use crate::bindings;
use crate::state::HostState;

/// Message of the trap raised when a plugin would block.
const WOULD_BLOCK: &str =
    "policy plugins must not block: a wasi:io operation was not ready";

/// Builds the linker for `component`.
pub(crate) fn linker(
    engine: &wasmtime::Engine,
    component: &Component,
) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    let l = &mut linker;

    bindings::Policy::add_to_linker::<_, HasSelf<_>>(l, |s| s)?;

    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(
        l,
        HostState::clocks,
    )?;
    random::random::add_to_linker::<_, WasiRandom>(l, HostState::random)?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, HostState::random)?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(
        l,
        HostState::random,
    )?;
    cli::exit::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;

    // Rust's standard library imports the filesystem interfaces. With no
    // preopens the plugin can never hold a descriptor, so the blocking
    // descriptor methods are unreachable.
    filesystem::preopens::add_to_linker::<_, WasiFilesystem>(
        l,
        HostState::filesystem,
    )?;
    sync_filesystem_types(l)?;

    async_io::error::add_to_linker::<_, TableIo>(l, HostState::table)?;
    sync_io::streams::add_to_linker::<_, NonBlockingIo>(l, table)?;
    sync_io::poll::add_to_linker::<_, NonBlockingIo>(l, table)?;

    l.define_unknown_imports_as_traps(component)?;
    Ok(linker)
}

fn sync_filesystem_types(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::bindings::sync::filesystem::types::add_to_linker::<
        _,
        WasiFilesystem,
    >(l, HostState::filesystem)
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

fn now_or_trap<T>(future: impl Future<Output = wasmtime::Result<T>>)
    -> wasmtime::Result<T> {
    ready_now(future).unwrap_or_else(|| Err(would_block()))
}

fn stream_now_or_trap<T>(future: impl Future<Output = StreamResult<T>>)
    -> StreamResult<T> {
    ready_now(future)
        .unwrap_or_else(|| Err(StreamError::Trap(would_block())))
}

impl sync_io::streams::Host for NonBlockingTable<'_> {
    fn convert_stream_error(
        &mut self,
        err: StreamError,
    ) -> wasmtime::Result<sync_io::streams::StreamError> {
        sync_io::streams::Host::convert_stream_error(self.0, err)
    }
}

impl sync_io::streams::HostOutputStream for NonBlockingTable<'_> {
    fn drop(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<()> {
        use async_io::streams::HostOutputStream as Async;
        now_or_trap(Async::drop(self.0, stream))
    }

    fn check_write(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> StreamResult<u64> {
        sync_io::streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        sync_io::streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_write_and_flush(
            self.0, stream, bytes,
        ))
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        sync_io::streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        sync_io::streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        sync_io::streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> StreamResult<()> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_flush(self.0, stream))
    }

    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        sync_io::streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        use async_io::streams::HostOutputStream as Async;
        stream_now_or_trap(Async::blocking_splice(self.0, dst, src, len))
    }
}

impl sync_io::streams::HostInputStream for NonBlockingTable<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        use async_io::streams::HostInputStream as Async;
        now_or_trap(Async::drop(self.0, stream))
    }

    fn read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        sync_io::streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        use async_io::streams::HostInputStream as Async;
        stream_now_or_trap(Async::blocking_read(self.0, stream, len))
    }

    fn skip(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        sync_io::streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        use async_io::streams::HostInputStream as Async;
        stream_now_or_trap(Async::blocking_skip(self.0, stream, len))
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        sync_io::streams::HostInputStream::subscribe(self.0, stream)
    }
}

impl sync_io::poll::Host for NonBlockingTable<'_> {
    fn poll(
        &mut self,
        pollables: Vec<Resource<DynPollable>>,
    ) -> wasmtime::Result<Vec<u32>> {
        use async_io::poll::Host as Async;
        now_or_trap(Async::poll(self.0, pollables))
    }
}

impl sync_io::poll::HostPollable for NonBlockingTable<'_> {
    fn ready(
        &mut self,
        pollable: Resource<DynPollable>,
    ) -> wasmtime::Result<bool> {
        // `ready` only asks; an unready pollable is an answer, not a block.
        use async_io::poll::HostPollable as Async;
        ready_now(Async::ready(self.0, pollable)).unwrap_or(Ok(false))
    }

    fn block(
        &mut self,
        pollable: Resource<DynPollable>,
    ) -> wasmtime::Result<()> {
        use async_io::poll::HostPollable as Async;
        now_or_trap(Async::block(self.0, pollable))
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        sync_io::poll::HostPollable::drop(self.0, pollable)
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
