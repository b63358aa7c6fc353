//! A client socket that joins the reactor only once it has to wait.
//!
//! Most short connections never wait on their client: the request is
//! already there when the connection is accepted, and the response fits the
//! socket's send buffer. So each read and write is first tried on the bare
//! non-blocking socket, and only a `WouldBlock` registers it with tokio's
//! reactor, which from then on waits for it as usual. A connection served
//! without waiting saves the two `epoll_ctl` calls (add, then delete on
//! close) that registering costs, as HAProxy's speculative I/O does.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::h1;

/// The most a read tries before the socket is registered. The buffer it
/// reads into is zeroed first (safe code cannot read into uninitialised
/// memory), so this bounds that cost; a request head is usually far less.
const SPECULATIVE_READ: usize = 2048;

/// A TCP stream that is registered with the reactor on its first
/// `WouldBlock`.
#[derive(Debug)]
pub struct LazyTcp {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Not registered yet: reads and writes go straight to the socket.
    Bare(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed (the reactor is gone); every call fails.
    Lost,
}

impl LazyTcp {
    /// Wraps an accepted socket, which must be in non-blocking mode.
    pub fn new(socket: std::net::TcpStream) -> Self {
        LazyTcp {
            state: State::Bare(socket),
        }
    }

    /// Wraps a stream that has joined the reactor already.
    pub fn from_registered(stream: TcpStream) -> Self {
        LazyTcp {
            state: State::Registered(stream),
        }
    }

    /// Whether the socket has joined the reactor.
    pub fn is_registered(&self) -> bool {
        matches!(self.state, State::Registered(_))
    }

    /// The socket, off the reactor (deregistered if it had joined).
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self.state {
            State::Bare(socket) => Ok(socket),
            State::Registered(stream) => stream.into_std(),
            State::Lost => Err(lost()),
        }
    }

    /// The registered stream, registering the socket first if needed.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.state, State::Bare(_)) {
            if let State::Bare(socket) = std::mem::replace(&mut self.state, State::Lost) {
                self.state = State::Registered(TcpStream::from_std(socket)?);
            }
        }
        match &mut self.state {
            State::Registered(stream) => Ok(stream),
            _ => Err(lost()),
        }
    }

    /// Runs `op` on the bare socket. `None` means it would block (or the
    /// socket is registered already): the caller goes through the reactor.
    fn try_bare<R>(
        &mut self,
        mut op: impl FnMut(&std::net::TcpStream) -> io::Result<R>,
    ) -> Option<io::Result<R>> {
        let State::Bare(socket) = &self.state else {
            return None;
        };
        loop {
            match op(socket) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                done => return Some(done),
            }
        }
    }

    /// A write: `bare` on the bare socket, else `registered` through the
    /// reactor.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        bare: impl FnMut(&std::net::TcpStream) -> io::Result<usize>,
        registered: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Some(written) = self.try_bare(bare) {
            return Poll::Ready(written);
        }
        match self.registered() {
            Ok(stream) => registered(Pin::new(stream), cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "socket could not join the reactor",
    )
}

impl AsyncRead for LazyTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(SPECULATIVE_READ);
        // Only a bare socket is read here, into initialised memory: a
        // registered one reads into the buffer's spare room as it is.
        if want > 0 && !this.is_registered() {
            let read = {
                let dst = buf.initialize_unfilled_to(want);
                this.try_bare(|mut socket| socket.read(dst))
            };
            if let Some(read) = read {
                return Poll::Ready(read.map(|n| buf.advance(n)));
            }
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for LazyTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(
            cx,
            |mut socket| socket.write(buf),
            |stream, cx| stream.poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(
            cx,
            |mut socket| socket.write_vectored(bufs),
            |stream, cx| stream.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Bare(socket) => Poll::Ready(socket.shutdown(Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl h1::Transport for LazyTcp {
    /// Waiting needs the reactor, so this registers the socket.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.registered() {
            Ok(stream) => stream.poll_read_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn parkable(&self) -> bool {
        true
    }

    fn into_parkable(self: Box<Self>) -> Option<std::net::TcpStream> {
        (*self).into_std().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (LazyTcp, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (LazyTcp::new(server), client)
    }

    /// Bytes that are already there are read, and the answer written,
    /// without the socket ever joining the reactor.
    #[tokio::test]
    async fn a_ready_exchange_never_registers() {
        let (server, mut client) = pair().await;
        client.write_all(b"ping").await.unwrap();
        // Wait until the bytes have crossed loopback, looking at the bare
        // socket so the lazy one's state is untouched.
        let bare = server.into_std().unwrap();
        let mut probe = [0u8; 4];
        while bare.peek(&mut probe).map_or(true, |n| n < 4) {
            tokio::task::yield_now().await;
        }
        let mut server = LazyTcp::new(bare);
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        assert!(!server.is_registered());
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
    }

    /// A read with nothing to read registers the socket and waits for the
    /// bytes instead of failing or spinning.
    #[tokio::test]
    async fn a_read_that_would_block_registers_and_waits() {
        let (mut server, mut client) = pair().await;
        let mut space = [0u8; 8];
        let first = std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut space);
            Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut buf).is_pending())
        })
        .await;
        assert!(first, "a read with nothing sent did not wait");
        assert!(server.is_registered());
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    /// Waiting for readability registers the socket.
    #[tokio::test]
    async fn waiting_for_readability_registers() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"x").await.unwrap();
        std::future::poll_fn(|cx| h1::Transport::poll_read_ready(&mut server, cx))
            .await
            .unwrap();
        assert!(server.is_registered());
        let mut got = [0u8; 1];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }
}
