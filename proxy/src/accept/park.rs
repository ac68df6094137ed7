//! Accept, the parking lot: where the sockets of parked HTTP/1 connections wait (`idle.rs`
//! decides when a connection is quiet enough), outside tokio, until their client sends
//! again or closes. Then the lot hands each one back to be served on a new task.
//!
//! Why not wait in the connection's own task: a waiting task keeps its task cell (768
//! bytes) and tokio's registration of its socket (256 bytes). Both were allocated between
//! the connection's hyper buffers, which parking frees; glibc can give a page back only
//! when nothing on it is live, so 10,000 connections parked in their tasks held 11 MB of
//! state but kept 49.5 MiB of anonymous memory resident (10.7 MiB with this lot). Here a
//! parked connection is a socket in one epoll set and an entry in one table, and its
//! task and registration are freed.
//!
//! The lot must not read or write the sockets (that is for the hyper connection that
//! serves them next), and holds its lock only for table and epoll updates.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollFlags};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

/// Parked sockets, each with `T`: what its listener needs to serve it again.
#[derive(Debug)]
pub(super) struct Lot<T> {
    /// Readable (for tokio) when any parked socket is: a level-triggered epoll set of them.
    epoll: AsyncFd<sys::Set>,
    /// By descriptor, which stays unique while the socket is held here; with when it
    /// was parked.
    parked: Mutex<HashMap<RawFd, (std::net::TcpStream, T, Instant)>>,
    gauge: Gauge,
    parks: Counter,
    /// A socket parked this long is closed (`--client-idle-timeout-secs`); None: never.
    idle_limit: Option<Duration>,
}

/// What wakes a parked socket: bytes to read, or the client closing (which the next
/// hyper connection reads as end of file, and closes).
const WAKE: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLRDHUP);

impl<T> Lot<T> {
    /// `gauge` counts the connections parked now, `parks` every parking; a socket
    /// parked for `idle_limit` is closed.
    pub fn new(gauge: Gauge, parks: Counter, idle_limit: Option<Duration>) -> io::Result<Self> {
        Ok(Lot { epoll: sys::create()?, parked: Mutex::new(HashMap::new()), gauge, parks, idle_limit })
    }

    /// Takes `socket` out of tokio into the lot. Gives it back, with `resume`, when the
    /// lot cannot watch it (epoll refused it): the caller then waits on it itself.
    pub fn park(&self, socket: TcpStream, resume: T) -> Option<(TcpStream, T)> {
        let fd = socket.as_raw_fd();
        // Added and inserted under the lock: `run` may see the socket ready at once, and
        // must find its entry.
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.epoll.get_ref().add(&socket, WAKE) {
            tracing::debug!("parking a connection in its task: epoll refused it: {e}");
            return Some((socket, resume));
        }
        // Deregisters it from tokio's own epoll set; it stays non-blocking.
        match socket.into_std() {
            Ok(socket) => {
                parked.insert(fd, (socket, resume, Instant::now()));
                self.gauge.inc();
                self.parks.inc();
            }
            // Only if tokio's deregistration failed; the socket is closed by then, which
            // took it out of the epoll set too (nothing else holds its file description).
            Err(e) => tracing::debug!("parking a connection failed, closed it: {e}"),
        }
        None
    }

    /// Hands every socket that becomes readable to `resume`, registered with tokio again,
    /// and closes those parked past the idle limit. Runs for as long as the lot serves its
    /// listener.
    pub async fn run(&self, mut resume: impl FnMut(TcpStream, T)) {
        let mut events = [EpollEvent::empty(); 64];
        // A sweep every quarter of the limit: a socket is closed within 1.25 times it.
        let period = self.idle_limit.map_or(Duration::from_secs(3600), |l| (l / 4).max(Duration::from_millis(10)));
        let mut sweep = tokio::time::interval(period);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let readable = tokio::select! {
                r = self.epoll.readable() => r,
                _ = sweep.tick() => {
                    self.close_idle();
                    continue;
                }
            };
            let mut ready = match readable {
                Ok(r) => r,
                Err(e) => return tracing::error!("parked connections are no longer watched: {e}"),
            };
            // WouldBlock (none ready) clears tokio's readiness until the set changes.
            let n = match ready.try_io(|epoll| epoll.get_ref().wait(&mut events)) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return tracing::error!("parked connections are no longer watched: {e}"),
                Err(_would_block) => continue,
            };
            for event in &events[..n] {
                // The key given at EPOLL_CTL_ADD: the descriptor.
                let Some((socket, t, _)) = RawFd::try_from(event.data()).ok().and_then(|fd| self.take(fd)) else {
                    continue;
                };
                match TcpStream::from_std(socket) {
                    Ok(socket) => resume(socket, t),
                    Err(e) => tracing::debug!("a parked connection could not be served again: {e}"),
                }
            }
        }
    }

    /// Parked connections now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Closes the sockets parked longer than the idle limit, as a server closes a
    /// keep-alive connection that has been quiet too long: otherwise clients that never
    /// come back would hold descriptors for ever.
    fn close_idle(&self) {
        let Some(limit) = self.idle_limit else { return };
        let stale: Vec<RawFd> = {
            let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            parked.iter().filter(|(_, (_, _, since))| since.elapsed() >= limit).map(|(fd, _)| *fd).collect()
        };
        for fd in &stale {
            // Dropped here: the socket closes.
            self.take(*fd);
        }
        if !stale.is_empty() {
            tracing::debug!("closed {} connections parked longer than {limit:?}", stale.len());
        }
    }

    fn take(&self, fd: RawFd) -> Option<(std::net::TcpStream, T, Instant)> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let entry = parked.remove(&fd)?;
        // Out of the set before tokio registers it (level-triggered: it would be reported
        // again at every wait). Removing an open, added descriptor does not fail.
        let _ = self.epoll.get_ref().delete(&entry.0);
        // After a burst, give the table's memory back rather than keep it for the peak.
        let len = parked.len();
        if parked.capacity() > 64 && len * 4 < parked.capacity() {
            parked.shrink_to(len * 2);
        }
        self.gauge.dec();
        Some(entry)
    }
}

impl<T> Drop for Lot<T> {
    /// The listener is gone (shutdown): its parked connections close with it.
    fn drop(&mut self) {
        let n = self.parked.get_mut().map_or(0, |p| p.len());
        self.gauge.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The epoll set (nix's `Epoll`), and its registration with tokio.
mod sys {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, RawFd};

    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use tokio::io::unix::AsyncFd;

    /// An epoll set, as tokio needs it (`AsRawFd`, which `Epoll` does not implement).
    /// Private, so its descriptor is never replaced while tokio has it registered.
    #[derive(Debug)]
    pub struct Set(Epoll);

    impl AsRawFd for Set {
        fn as_raw_fd(&self) -> RawFd {
            self.0.0.as_raw_fd()
        }
    }

    /// A new epoll set, registered with tokio (readable when a socket in it is ready).
    #[allow(unsafe_code)]
    pub fn create() -> io::Result<AsyncFd<Set>> {
        let set = Set(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        // SAFETY: the set's `OwnedFd` is open, and names the same descriptor, until it is
        // dropped, which the `AsyncFd` owning it does last; `Set` gives no way to replace it.
        Ok(unsafe { AsyncFd::register_with_interest(set, tokio::io::Interest::READABLE) }?)
    }

    impl Set {
        /// Adds `socket`, keyed by its descriptor, to wake on `events`.
        pub fn add(&self, socket: impl AsFd, events: EpollFlags) -> io::Result<()> {
            let key = u64::try_from(socket.as_fd().as_raw_fd()).unwrap_or(u64::MAX);
            Ok(self.0.add(socket, EpollEvent::new(events, key))?)
        }

        /// Removes `socket`.
        pub fn delete(&self, socket: impl AsFd) -> io::Result<()> {
            Ok(self.0.delete(socket)?)
        }

        /// The ready events, without blocking; WouldBlock when there are none.
        pub fn wait(&self, events: &mut [EpollEvent]) -> io::Result<usize> {
            match self.0.wait(events, EpollTimeout::ZERO)? {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_parked_socket_comes_back_when_its_client_sends_or_closes() {
        let lot = std::sync::Arc::new(Lot::new(Gauge::default(), Counter::default(), None).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut back) = tokio::sync::mpsc::unbounded_channel();
        let runner = tokio::spawn({
            let lot = std::sync::Arc::clone(&lot);
            async move { lot.run(|socket, n: u32| tx.send((socket, n)).unwrap()).await }
        });
        let mut clients = Vec::new();
        for n in 0..3u32 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            assert!(lot.park(server, n).is_none());
            clients.push(client);
        }
        assert_eq!((lot.len(), lot.gauge.get(), lot.parks.get()), (3, 3, 3));

        clients[1].write_all(b"GET").await.unwrap();
        let (mut server, n) = back.recv().await.unwrap();
        assert_eq!(n, 1);
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET", "nothing was read by the lot");
        assert_eq!(lot.gauge.get(), 2);

        drop(clients.remove(2));
        let (mut server, n) = back.recv().await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "the client's close is end of file");

        // Back with tokio: the socket can be parked again.
        clients[0].write_all(b"x").await.unwrap();
        let (server, n) = back.recv().await.unwrap();
        assert!(lot.park(server, n).is_none());
        let (_server, n) = back.recv().await.unwrap();
        assert_eq!((n, lot.len()), (0, 0), "still readable: handed back at once");

        // A lot dropped with its listener closes what it holds.
        let client = TcpStream::connect(addr).await.unwrap();
        assert!(lot.park(listener.accept().await.unwrap().0, 9).is_none());
        let gauge = lot.gauge.clone();
        runner.abort();
        let _ = runner.await;
        drop(std::sync::Arc::into_inner(lot).unwrap());
        assert_eq!(gauge.get(), 0);
        let mut client = client;
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "closed with the lot");
    }

    #[tokio::test]
    async fn a_socket_parked_past_the_idle_limit_is_closed() {
        let limit = Duration::from_millis(300);
        let lot = std::sync::Arc::new(Lot::new(Gauge::default(), Counter::default(), Some(limit)).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let parked_at = Instant::now();
        assert!(lot.park(listener.accept().await.unwrap().0, ()).is_none());
        let runner = tokio::spawn({
            let lot = std::sync::Arc::clone(&lot);
            async move { lot.run(|_, ()| panic!("the client never sent")).await }
        });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        assert_eq!(read.expect("closed within 5 s").unwrap(), 0, "closed by the lot");
        let waited = parked_at.elapsed();
        assert!(waited >= limit, "closed after {waited:?}, before the limit {limit:?}");
        assert_eq!((lot.len(), lot.gauge.get()), (0, 0));
        runner.abort();
    }
}
