//! A plain-TCP connection that sends slices of cached blob maps with `sendfile(2)`.
//!
//! `Sendfile` wraps the `TcpStream` of a connection without TLS and is otherwise transparent.
//! hyper writes a response as a vector of slices (its head buffer, then the body's `Bytes` as
//! they are: it queues body buffers instead of copying them when the IO is vectored, see
//! hyper's `proto::h1::io::WriteStrategy::Queue`). When the first slice it hands over lies in a
//! live map of a cached file (`cache::mapped::locate`), that slice, and the slices right after
//! it that continue it in the same map, go out with `sendfile` from the file at the same offset:
//! the kernel moves page cache to the socket and berth copies nothing. Other slices are written
//! as before, up to the first mapped one. The bytes are the same by construction (the map is
//! of that immutable file), so nothing above this layer can tell, whatever the protocol.
//!
//! Only bodies `cache::reader` handed out as map slices (`Copier::Kernel`: plain-TCP
//! HTTP/1.x) are ever found here; others pass through unchanged. Sent bytes are counted in
//! `berth_sendfile_bytes_total`. Deliberately not here: residency (a chunk is a map slice only
//! when its pages are in memory, so `sendfile` does not wait for the disk), timeouts
//! (`limits::WriteDeadline` wraps this).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::cache::mapped::{self, Located};

/// A client connection whose mapped body slices go out with `sendfile`.
pub(crate) struct Sendfile {
    stream: TcpStream,
    /// Bytes sent with `sendfile` (`berth_sendfile_bytes_total`).
    sent: IntCounter,
}

impl Sendfile {
    pub fn new(stream: TcpStream, sent: IntCounter) -> Sendfile {
        Sendfile { stream, sent }
    }

    /// Sends `count` bytes of `at.file` from `at.offset`, as much as the socket takes now.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        at: &Located,
        count: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let mut offset = at.offset;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.stream, &*at.file, Some(&mut offset), count)
                    .map_err(io::Error::from)
            });
            match sent {
                // The file is shorter than its map: truncated by someone else (`cache::mapped`).
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cached file shorter than its map",
                    )))
                }
                Ok(n) => {
                    self.sent.inc_by(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

/// What to do with a vector of slices: write its leading unmapped slices (`Write(n)`: the
/// first `n`), or send a run of mapped ones (`Send`: where, and how many bytes).
enum Plan {
    Write(usize),
    Send(Located, usize),
}

fn plan(bufs: &[IoSlice<'_>]) -> Plan {
    let mut plain = 0;
    for (i, buf) in bufs.iter().enumerate() {
        let Some(at) = mapped::locate(buf) else {
            plain += buf.len();
            continue;
        };
        if plain > 0 {
            return Plan::Write(i);
        }
        // Adjacent slices of the same map (consecutive chunks of one body) go in one call.
        let mut count = buf.len();
        let mut end = buf.as_ptr() as usize + buf.len();
        for next in &bufs[i + 1..] {
            if next.as_ptr() as usize != end || count + next.len() > at.room {
                break;
            }
            count += next.len();
            end += next.len();
        }
        return Plan::Send(at, count);
    }
    Plan::Write(bufs.len())
}

impl AsyncRead for Sendfile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sendfile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match plan(bufs) {
            Plan::Send(at, count) => self.poll_send(cx, &at, count),
            Plan::Write(n) => Pin::new(&mut self.stream).poll_write_vectored(cx, &bufs[..n]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper queues body `Bytes` (and so map slices) only for a vectored IO.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, Bytes};
    use std::fs::File;
    use std::io::Write;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    /// A connected pair over loopback: berth's side wrapped, the client's side with a receive
    /// buffer of `recv_buffer` bytes when given.
    async fn pair(recv_buffer: Option<u32>) -> (Sendfile, TcpStream, IntCounter) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let sent = IntCounter::new("sent", "sent").unwrap();
        let server = Sendfile::new(accepted.unwrap().0, sent.clone());
        (server, client.unwrap(), sent)
    }

    /// A mapped blob of `len` patterned bytes, as `cache::reader` hands them out.
    fn mapped_blob(len: usize) -> Bytes {
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&content).unwrap();
        let file: Arc<File> = Arc::new(file);
        mapped::map(&file, len as u64).unwrap()
    }

    /// Writes all of `buf` as hyper does (vectored), shuts down, and returns what arrived.
    async fn deliver(mut server: Sendfile, mut client: TcpStream, mut buf: impl Buf) -> Vec<u8> {
        let writing = async move {
            server.write_all_buf(&mut buf).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let reading = async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            received
        };
        tokio::join!(writing, reading).1
    }

    #[tokio::test]
    async fn a_slice_of_a_mapped_blob_goes_out_with_sendfile_byte_identical() {
        let (server, client, sent) = pair(None).await;
        let blob = mapped_blob(3 << 20);
        let received = deliver(server, client, blob.clone()).await;
        assert!(received == blob[..]);
        assert_eq!(sent.get(), 3 << 20);
    }

    #[tokio::test]
    async fn other_memory_is_written_and_a_head_arrives_before_its_mapped_body() {
        let (server, client, sent) = pair(None).await;
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n");
        let blob = mapped_blob(100_000);
        let received = deliver(server, client, head.clone().chain(blob.clone())).await;
        assert_eq!(&received[..head.len()], &head[..]);
        assert!(received[head.len()..] == blob[..]);
        assert_eq!(sent.get(), 100_000, "only the body went out with sendfile");

        let (server, client, sent) = pair(None).await;
        let copied = Bytes::from(blob.to_vec());
        assert!(deliver(server, client, copied.clone()).await == copied[..]);
        assert_eq!(sent.get(), 0, "a copy of the bytes is not a map");
    }

    #[tokio::test]
    async fn a_slow_reader_with_a_small_buffer_gets_every_byte_in_order() {
        let (server, mut client, sent) = pair(Some(4096)).await;
        let blob = mapped_blob(4 << 20);
        // Two adjacent chunks of one map, then another map's, between unmapped pieces.
        let (first, second) = (blob.slice(..1 << 20), blob.slice(1 << 20..));
        let other = mapped_blob(300_000);
        let buf = Bytes::from_static(b"head")
            .chain(first)
            .chain(second)
            .chain(Bytes::from_static(b"middle"))
            .chain(other.clone())
            .chain(Bytes::from_static(b"tail"));
        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&blob);
        expected.extend_from_slice(b"middle");
        expected.extend_from_slice(&other);
        expected.extend_from_slice(b"tail");
        let mut server = server;
        let writing = async move {
            let mut buf = buf;
            server.write_all_buf(&mut buf).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let reading = async move {
            let (mut received, mut piece) = (Vec::new(), [0u8; 1000]);
            loop {
                let n = client.read(&mut piece).await.unwrap();
                if n == 0 {
                    return received;
                }
                received.extend_from_slice(&piece[..n]);
                tokio::task::yield_now().await;
            }
        };
        let received = tokio::join!(writing, reading).1;
        assert!(received == expected);
        assert_eq!(sent.get(), (4 << 20) + 300_000);
    }
}
