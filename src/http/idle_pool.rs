//! Idle HTTP/1 upstream connections kept for their next user, per key: the
//! outbound side's tunnels to a peer's `http` port and its mTLS connections
//! to peers without tunnels (per expected identity and destination), the
//! inbound side's connections to the app (per app address). A connection
//! is taken back only if it is still open (nothing to read: a close, a
//! reset or unasked-for bytes all mean it can carry no request) and was
//! parked less than the pool's idle time ago.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// Idle connections of type `T` with what the caller keeps beside each
/// (`E`: for example the peer identity it reached).
pub(crate) struct IdlePool<T, E = ()> {
    idle: Mutex<ByKey<T, E>>,
    max_idle: Duration,
    per_key: usize,
}

/// The parked connections of each key, oldest first. Hashed with foldhash
/// (randomly seeded), not std's SipHash: with a take and a put per request
/// SipHash was 2 to 3 % of a sidecar's instructions on the HTTP path
/// (callgrind), and the keys are the sidecar's own destinations, few and
/// not a stranger's choice.
type ByKey<T, E> = HashMap<Arc<str>, Vec<Parked<T, E>>, foldhash::fast::RandomState>;

struct Parked<T, E> {
    conn: T,
    extra: E,
    since: Instant,
}

impl<T: AsyncRead + Unpin, E> IdlePool<T, E> {
    /// A pool keeping up to `per_key` connections per key, each for up to
    /// `max_idle` (keep it under the far end's own idle timeout).
    pub(crate) fn new(max_idle: Duration, per_key: usize) -> Self {
        Self {
            idle: Mutex::new(HashMap::default()),
            max_idle,
            per_key,
        }
    }

    /// The most recently parked live connection for `key`, if any.
    pub(crate) fn take(&self, key: &str) -> Option<(T, E)> {
        let mut idle = self.lock();
        let parked = idle.get_mut(key)?;
        while let Some(mut p) = parked.pop() {
            if p.since.elapsed() < self.max_idle && still_open(&mut p.conn) {
                return Some((p.conn, p.extra));
            }
        }
        None
    }

    /// Parks a connection left idle and reusable (dropped, so closed, if
    /// the key already holds its share).
    pub(crate) fn put(&self, key: Arc<str>, conn: T, extra: E) {
        let mut idle = self.lock();
        let parked = idle.entry(key).or_default();
        // Only a full key makes room by dropping what waited too long:
        // below the cap `take` and the sweep skip those anyway, and a put
        // on every request should not read the clock for each parked one.
        if parked.len() >= self.per_key {
            parked.retain(|p| p.since.elapsed() < self.max_idle);
        }
        if parked.len() < self.per_key {
            parked.push(Parked {
                conn,
                extra,
                since: Instant::now(),
            });
        }
    }

    /// Closes (drops) every connection parked too long or no longer open,
    /// so a pool no request visits holds no descriptor past its idle time
    /// (a connection the far end closed would otherwise wait in
    /// CLOSE_WAIT).
    pub(crate) fn sweep(&self) {
        let mut idle = self.lock();
        idle.retain(|_, parked| {
            parked.retain_mut(|p| p.since.elapsed() < self.max_idle && still_open(&mut p.conn));
            !parked.is_empty()
        });
    }

    /// How often [`Self::sweep`] should run: the idle time.
    pub(crate) fn max_idle(&self) -> Duration {
        self.max_idle
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByKey<T, E>> {
        // Each critical section is a push or a pop: never torn.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a parked connection is still open: nothing to read yet.
fn still_open<T: AsyncRead + Unpin>(conn: &mut T) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        std::pin::Pin::new(conn).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn only_open_quiet_recent_connections_come_back() {
        let pool: IdlePool<TcpStream, u8> = IdlePool::new(Duration::from_secs(30), 2);
        let key: Arc<str> = "app".into();
        let (quiet, _quiet_far) = pair().await;
        let (closed, closed_far) = pair().await;
        let (chatty, mut chatty_far) = pair().await;
        pool.put(key.clone(), quiet, 1);
        pool.put(key.clone(), closed, 2);
        pool.put(key.clone(), chatty, 3);
        drop(closed_far);
        chatty_far.write_all(b"unasked").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The third was over the key's share (2) and dropped; the closed
        // one is skipped; the quiet one comes back, once.
        assert_eq!(pool.take("app").map(|(_, e)| e), Some(1));
        assert!(pool.take("app").is_none());
        assert!(pool.take("other").is_none());
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_not_reused() {
        let pool: IdlePool<TcpStream> = IdlePool::new(Duration::from_millis(20), 4);
        let (conn, _far) = pair().await;
        pool.put("app".into(), conn, ());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(pool.take("app").is_none());
    }

    #[tokio::test]
    async fn a_full_key_makes_room_by_dropping_what_waited_too_long() {
        let pool: IdlePool<TcpStream, u8> = IdlePool::new(Duration::from_millis(20), 1);
        let (stale, _stale_far) = pair().await;
        let (fresh, _fresh_far) = pair().await;
        pool.put("app".into(), stale, 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        pool.put("app".into(), fresh, 2);
        assert_eq!(pool.take("app").map(|(_, e)| e), Some(2));
    }

    #[tokio::test]
    async fn a_sweep_closes_what_no_request_would_take() {
        let pool: IdlePool<TcpStream> = IdlePool::new(Duration::from_secs(30), 4);
        let (open, _open_far) = pair().await;
        let (closed, closed_far) = pair().await;
        pool.put("a".into(), open, ());
        pool.put("b".into(), closed, ());
        drop(closed_far);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.sweep();
        assert_eq!(pool.lock().len(), 1, "the closed one's key is gone");
        assert!(pool.take("a").is_some());
        let short: IdlePool<TcpStream> = IdlePool::new(Duration::from_millis(20), 4);
        let (conn, mut far) = pair().await;
        short.put("a".into(), conn, ());
        tokio::time::sleep(Duration::from_millis(40)).await;
        short.sweep();
        assert!(short.lock().is_empty());
        // Swept means closed: the far end reads EOF.
        let mut byte = [0u8; 1];
        assert_eq!(
            tokio::io::AsyncReadExt::read(&mut far, &mut byte)
                .await
                .unwrap(),
            0
        );
    }
}
