//! Ring all-reduce over TCP: the bandwidth-optimal collective of Patarasuk & Yuan (2009), the one
//! NCCL and Horovod use for large messages.
//!
//! The vector is cut into `world` segments. In the **reduce-scatter** half, each of `world − 1`
//! steps sends one segment to the right neighbour while receiving another from the left and
//! adding it in; afterwards rank `r` holds the full sum of segment `r + 1`. The **all-gather** half
//! passes the summed segments around the ring the same way, copying instead of adding. Each link
//! carries `2 (world − 1) / world` of the vector, whatever the world size.
//!
//! Within a step, sending and receiving run at once (a scoped sender thread; the receiver adds
//! as chunks land), so both directions of every link are busy and the additions overlap the
//! transfers. Values travel as little-endian `f64`: every rank of a job runs the same binary on
//! the same architecture.
//!
//! A peer that dies shows as an end of stream or a reset on the next read or write: the error
//! names the neighbour, and the rank fails at once instead of hanging. A peer that hangs is cut
//! off by the collective timeout.

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
}

#[derive(Debug, Clone, Copy)]
enum Combine {
    Add,
    Copy,
}

impl Ring {
    /// A world of one: every reduction is the identity.
    pub fn alone() -> Self {
        Ring { rank: 0, world: 1, left: None, right: None, scratch: Vec::new() }
    }

    /// A ring from established links: `left` from rank − 1, `right` to rank + 1.
    pub fn new(rank: usize, world: usize, left: TcpStream, right: TcpStream) -> Self {
        Ring { rank, world, left: Some(left), right: Some(right), scratch: vec![0.0; CHUNK_BYTES / 8] }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Replace `data` on every rank by the element-wise sum over all ranks.
    pub fn all_reduce_sum(&mut self, data: &mut [f64]) -> Result<(), RingError> {
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

    /// Send `data[send]` to the right while receiving into `data[recv]` from the left.
    fn exchange(
        &mut self,
        data: &mut [f64],
        send: &Range<usize>,
        recv: &Range<usize>,
        combine: Combine,
        during: &'static str,
    ) -> Result<(), RingError> {
        let (outgoing, incoming) = disjoint(data, send, recv);
        let (Some(left), Some(right)) = (&self.left, &self.right) else { return Ok(()) };
        let (w, r) = (self.world, self.rank);
        let scratch = &mut self.scratch;
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> std::io::Result<()> {
                let mut right = right;
                for chunk in bytemuck::cast_slice::<f64, u8>(outgoing).chunks(CHUNK_BYTES) {
                    right.write_all(chunk)?;
                }
                Ok(())
            });
            let received = (|| -> std::io::Result<()> {
                let mut left = left;
                for part in incoming.chunks_mut(scratch.len()) {
                    let buffer = &mut scratch[..part.len()];
                    left.read_exact(bytemuck::cast_slice_mut::<f64, u8>(buffer))?;
                    match combine {
                        Combine::Add => part.iter_mut().zip(buffer.iter()).for_each(|(d, s)| *d += s),
                        Combine::Copy => part.copy_from_slice(buffer),
                    }
                }
                Ok(())
            })();
            let sent = sender.join().unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            // The receive error first: a dead left neighbour is the cause, a broken pipe to the
            // right often its echo.
            received.map_err(|source| RingError::Peer { peer: (r + w - 1) % w, side: "left", during, source })?;
            sent.map_err(|source| RingError::Peer { peer: (r + 1) % w, side: "right", during, source })
        })
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
