//! Ring all-reduce over TCP: the bandwidth-optimal collective of Patarasuk & Yuan (2009), the one
//! NCCL and Horovod use for large messages.
//!
//! The vector is cut into `world` segments. In the **reduce-scatter** half, each of `world − 1`
//! steps sends one segment to the right neighbour while receiving another from the left and
//! adding it in; afterwards rank `r` holds the full sum of segment `r + 1`. The **all-gather** half
//! passes the summed segments around the ring the same way, copying instead of adding. Each link
//! carries `2 (world − 1) / world` of the vector, whatever the world size.
//!
//! Within a step, sending and receiving run at once on one thread over non-blocking sockets (the
//! receiver adds as bytes land), so both directions of every link are busy and the additions
//! overlap the transfers. Values travel as little-endian `f64`: every rank of a job runs the same binary on
//! the same architecture.
//!
//! A peer that dies shows as an end of stream or a reset on the next read or write: the error
//! names the neighbour, and the rank fails at once instead of hanging. A peer that hangs is cut
//! off by the collective timeout.
//!
//! Waiting spins briefly, then yields the CPU, then naps up to a millisecond: between the chunks
//! of one all-reduce the next bytes are microseconds away, but a peer still computing its step
//! may be many milliseconds away, and a waiting rank must not burn a core.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;

/// Bytes moved per read or write: large enough to amortize system calls, small enough that the
/// additions of one chunk overlap the arrival of the next.
pub const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("rank {peer} ({side} neighbour) failed or closed the connection during {during}: {source}")]
    Peer { peer: usize, side: &'static str, during: &'static str, source: std::io::Error },
    /// The sum holds a NaN or an infinity: some rank's contribution did (a diverged step, or a
    /// peer that is not one of the job's ranks). Every rank holds the same sum, so every rank
    /// fails the same step, before anything is updated or checkpointed from it.
    #[error("the all-reduced values are not finite (value {index} is {value})")]
    NotFinite { index: usize, value: f64 },
}

/// This rank's two links of the ring.
#[derive(Debug)]
pub struct Ring {
    rank: usize,
    world: usize,
    /// Receives from rank − 1; `None` in a world of one.
    left: Option<TcpStream>,
    /// Sends to rank + 1.
    right: Option<TcpStream>,
    scratch: Vec<f64>,
    /// A step with no progress for this long fails.
    timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy)]
enum Combine {
    Add,
    Copy,
}

impl Ring {
    /// A world of one: every reduction is the identity.
    pub fn alone() -> Self {
        Ring { rank: 0, world: 1, left: None, right: None, scratch: Vec::new(), timeout: std::time::Duration::MAX }
    }

    /// A ring from established links: `left` from rank − 1, `right` to rank + 1. A step that
    /// makes no progress for `timeout` fails.
    pub fn new(
        rank: usize,
        world: usize,
        left: TcpStream,
        right: TcpStream,
        timeout: std::time::Duration,
    ) -> std::io::Result<Self> {
        for s in [&left, &right] {
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
        }
        Ok(Ring { rank, world, left: Some(left), right: Some(right), scratch: vec![0.0; CHUNK_BYTES / 8], timeout })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Replace `data` on every rank by the element-wise sum over all ranks. A sum that is not
    /// finite everywhere is an error ([`RingError::NotFinite`]), on every rank alike.
    pub fn all_reduce_sum(&mut self, data: &mut [f64]) -> Result<(), RingError> {
        self.reduce(data)?;
        match data.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(RingError::NotFinite { index, value: data[index] }),
            None => Ok(()),
        }
    }

    fn reduce(&mut self, data: &mut [f64]) -> Result<(), RingError> {
        let w = self.world;
        if w == 1 || data.is_empty() {
            return Ok(());
        }
        let bounds = segments(data.len(), w);
        let r = self.rank;
        for step in 0..w - 1 {
            let send = (r + w - step) % w;
            let recv = (r + 2 * w - step - 1) % w;
            self.exchange(data, &bounds[send], &bounds[recv], Combine::Add, "reduce-scatter")?;
        }
        for step in 0..w - 1 {
            let send = (r + 1 + w - step) % w;
            let recv = (r + w - step) % w;
            self.exchange(data, &bounds[send], &bounds[recv], Combine::Copy, "all-gather")?;
        }
        Ok(())
    }

    /// Send `data[send]` to the right while receiving into `data[recv]` from the left, on one
    /// thread: both sockets are non-blocking and the loop moves whichever can move, so both
    /// directions stay busy without a thread per step (what MPI's progress engine does too).
    fn exchange(
        &mut self,
        data: &mut [f64],
        send: &Range<usize>,
        recv: &Range<usize>,
        combine: Combine,
        during: &'static str,
    ) -> Result<(), RingError> {
        let (outgoing, incoming) = disjoint(data, send, recv);
        let (w, r) = (self.world, self.rank);
        let (Some(mut left), Some(mut right)) = (self.left.as_ref(), self.right.as_ref()) else { return Ok(()) };
        let left_error = |source| RingError::Peer { peer: (r + w - 1) % w, side: "left", during, source };
        let right_error = |source| RingError::Peer { peer: (r + 1) % w, side: "right", during, source };
        let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");

        let out: &[u8] = bytemuck::cast_slice(outgoing);
        let mut sent = 0;
        // Received bytes: a copy lands in place; a sum lands in scratch and is added from there,
        // carrying a partial f64 over to the next read.
        let mut done = 0; // elements of `incoming` complete
        let mut pending = 0; // bytes in scratch (Add) or past `done` (Copy)
        let mut idle = Idle::new(self.timeout);
        while sent < out.len() || done < incoming.len() {
            let mut moved = false;
            if sent < out.len() {
                let end = (sent + CHUNK_BYTES).min(out.len());
                match right.write(&out[sent..end]) {
                    Ok(0) => return Err(right_error(closed())),
                    Ok(n) => (sent, moved) = (sent + n, true),
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(right_error(e)),
                }
            }
            if done < incoming.len() {
                let read = match combine {
                    Combine::Copy => {
                        let bytes = bytemuck::cast_slice_mut::<f64, u8>(&mut incoming[done..]);
                        let end = (pending + CHUNK_BYTES).min(bytes.len());
                        left.read(&mut bytes[pending..end])
                    }
                    Combine::Add => {
                        let bytes = bytemuck::cast_slice_mut::<f64, u8>(&mut self.scratch);
                        // Never past this step's bytes: the next step's may already be queued.
                        let end = ((incoming.len() - done) * 8).min(bytes.len());
                        left.read(&mut bytes[pending..end])
                    }
                };
                match read {
                    Ok(0) => return Err(left_error(closed())),
                    Ok(n) => {
                        pending += n;
                        moved = true;
                        let whole = pending / 8;
                        if let Combine::Add = combine {
                            incoming[done..done + whole]
                                .iter_mut()
                                .zip(&self.scratch[..whole])
                                .for_each(|(d, s)| *d += s);
                            bytemuck::cast_slice_mut::<f64, u8>(&mut self.scratch).copy_within(whole * 8..pending, 0);
                        }
                        done += whole;
                        pending -= whole * 8;
                    }
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(left_error(e)),
                }
            }
            if moved {
                idle.reset();
            } else if idle.wait() {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no progress within the collective timeout");
                return Err(if sent < out.len() { right_error(e) } else { left_error(e) });
            }
        }
        Ok(())
    }
}

fn retry(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted)
}

/// Waiting on both sockets: spin briefly (mid-transfer, data is microseconds away), then yield
/// the CPU, then sleep in growing naps up to a millisecond (a peer still computing its step can
/// be many milliseconds away, and a rank must not burn a core waiting for it), and give up after
/// the collective timeout without progress.
#[derive(Debug)]
struct Idle {
    spins: u32,
    since: Option<crate::clock::Deadline>,
    timeout: std::time::Duration,
}

impl Idle {
    fn new(timeout: std::time::Duration) -> Self {
        Idle { spins: 0, since: None, timeout }
    }

    fn reset(&mut self) {
        self.spins = 0;
        self.since = None;
    }

    /// Wait a little; true once the timeout has passed with no progress.
    fn wait(&mut self) -> bool {
        self.spins = self.spins.saturating_add(1);
        match self.spins {
            0..16 => {
                std::hint::spin_loop();
                return false;
            }
            16..80 => std::thread::yield_now(),
            n => {
                let nap = 10u64 << (n - 80).min(7); // 10 µs doubling to 1.28 ms
                std::thread::park_timeout(std::time::Duration::from_micros(nap.min(1_000)));
            }
        }
        let timeout = self.timeout;
        self.since.get_or_insert_with(|| crate::clock::Deadline::after(timeout)).passed()
    }
}

/// `len` elements cut into `world` contiguous segments whose sizes differ by at most one.
pub fn segments(len: usize, world: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / world, len % world);
    let mut start = 0;
    (0..world)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let range = start..start + size;
            start += size;
            range
        })
        .collect()
}

/// `&data[a]` and `&mut data[b]` for disjoint ranges.
fn disjoint<'a>(data: &'a mut [f64], a: &Range<usize>, b: &Range<usize>) -> (&'a [f64], &'a mut [f64]) {
    if a.start < b.start {
        let (head, tail) = data.split_at_mut(b.start);
        (&head[a.clone()], &mut tail[..b.len()])
    } else {
        let (head, tail) = data.split_at_mut(a.start);
        (&tail[..a.len()], &mut head[b.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (a, listener.accept().unwrap().0)
    }

    /// Rank 0 of a two-rank ring, the test playing rank 1 and dribbling its bytes 5 at a time:
    /// reads end mid-value, and one read could reach into the next half's bytes. It must not.
    #[test]
    fn reads_that_split_values_never_take_the_next_steps_bytes() {
        let (mut to_zero, left) = pair();
        let (right, mut from_zero) = pair();
        let mut ring = Ring::new(0, 2, left, right, Duration::from_secs(10)).unwrap();
        // Segments of 5 values: [0..3] and [3..5]. Rank 1 sends its segment 1 for rank 0 to add,
        // then the summed segment 0.
        let mut stream = Vec::new();
        for v in [40.0f64, 50.0, 11.0, 22.0, 33.0] {
            stream.extend_from_slice(&v.to_le_bytes());
        }
        let peer = std::thread::spawn(move || {
            for piece in stream.chunks(5) {
                to_zero.write_all(piece).unwrap();
                std::thread::park_timeout(Duration::from_millis(2));
            }
            let mut sink = vec![0u8; 5 * 8];
            from_zero.read_exact(&mut sink).unwrap();
        });
        let mut data = vec![1.0, 2.0, 3.0, 4.0, 5.0];
        ring.all_reduce_sum(&mut data).unwrap();
        peer.join().unwrap();
        assert_eq!(data, vec![11.0, 22.0, 33.0, 44.0, 55.0]);
    }

    /// Three ranks on loopback; rank 2's gradient holds a NaN. Every rank fails the step and none
    /// is left with the poisoned values as if they were fine.
    #[test]
    fn a_sum_that_is_not_finite_fails_on_every_rank() {
        let links: Vec<(TcpStream, TcpStream)> = (0..3).map(|_| pair()).collect();
        // Link k carries rank k → rank k + 1: its first end is k's right, its second k + 1's left.
        let (mut rights, mut lefts): (Vec<Option<TcpStream>>, Vec<Option<TcpStream>>) =
            links.into_iter().map(|(a, b)| (Some(a), Some(b))).unzip();
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                let left = lefts[(rank + 2) % 3].take().unwrap();
                let right = rights[rank].take().unwrap();
                std::thread::spawn(move || {
                    let mut ring = Ring::new(rank, 3, left, right, Duration::from_secs(10)).unwrap();
                    let mut data = vec![1.0; 7];
                    if rank == 2 {
                        data[4] = f64::NAN;
                    }
                    ring.all_reduce_sum(&mut data)
                })
            })
            .collect();
        for rank in ranks {
            match rank.join().unwrap() {
                Err(RingError::NotFinite { index: 4, value }) => assert!(value.is_nan()),
                other => panic!("want the NaN refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn segments_cover_the_vector_in_order_and_differ_by_at_most_one() {
        for len in 0..40 {
            for world in 1..9 {
                let s = segments(len, world);
                assert_eq!(s.len(), world);
                assert_eq!(s[0].start, 0);
                assert_eq!(s[world - 1].end, len);
                assert!(s.windows(2).all(|p| p[0].end == p[1].start));
                let sizes: Vec<usize> = s.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1);
            }
        }
    }
}
