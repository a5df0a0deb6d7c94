//! The timer heap behind `call_at`/`call_later` (asyncio's `_scheduled` heapq), and the clock.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// `time.monotonic()`: CLOCK_MONOTONIC in seconds, the base `loop.time()` shares with Python.
pub fn monotonic() -> f64 {
    // SAFETY: clock_gettime only writes the timespec; CLOCK_MONOTONIC always exists.
    read_clock(|ts| unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, ts) })
}

/// The resolution of the monotonic clock (asyncio's `_clock_resolution`).
pub fn monotonic_resolution() -> f64 {
    // SAFETY: as above, clock_getres only writes the timespec.
    read_clock(|ts| unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, ts) })
}

fn read_clock(call: impl FnOnce(&mut libc::timespec) -> libc::c_int) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    call(&mut ts);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

struct Entry<T> {
    /// The deadline as an integer with the same order as the f64 (see `order_key`), so the
    /// heap compares integers.
    key: u64,
    seq: u64,
    item: T,
}

/// An f64 as a u64 with the same order (IEEE 754 total order): flip the sign bit of
/// positive values, all bits of negative ones.
fn order_key(when: f64) -> u64 {
    let bits = when.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn from_order_key(key: u64) -> f64 {
    f64::from_bits(if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    })
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and we want the earliest deadline on top;
    // equal deadlines fire in scheduling order (seq).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.key, other.seq).cmp(&(self.key, self.seq))
    }
}

/// A min-heap of items by deadline; ties keep scheduling order.
pub struct TimerHeap<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

impl<T> Default for TimerHeap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerHeap<T> {
    pub fn new() -> Self {
        TimerHeap {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn push(&mut self, when: f64, item: T) {
        self.seq += 1;
        self.heap.push(Entry {
            key: order_key(when),
            seq: self.seq,
            item,
        });
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// The earliest entry, if any.
    pub fn peek(&self) -> Option<(f64, &T)> {
        self.heap.peek().map(|e| (from_order_key(e.key), &e.item))
    }

    pub fn pop(&mut self) -> Option<(f64, T)> {
        let e = self.heap.pop()?;
        self.shrink();
        Some((from_order_key(e.key), e.item))
    }

    /// Keep only the items for which `keep` is true (asyncio's purge of cancelled timers).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.heap.retain(|e| keep(&e.item));
        self.shrink();
    }

    /// Give memory back after a burst of timers has fired or been purged (a Python list
    /// shrinks the same way), so a past peak does not stay allocated.
    fn shrink(&mut self) {
        let (len, cap) = (self.heap.len(), self.heap.capacity());
        if cap > 1024 && len < cap / 4 {
            self.heap.shrink_to(len * 2);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.heap.iter().map(|e| &e.item)
    }

    /// Remove every item, handing each to `f` (so the caller can unmark it).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.heap.drain().map(|e| e.item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_scheduling_order() {
        let mut h = TimerHeap::new();
        h.push(2.0, "c");
        h.push(1.0, "a");
        h.push(1.0, "b");
        h.push(0.5, "first");
        let order: Vec<_> = std::iter::from_fn(|| h.pop().map(|(_, x)| x)).collect();
        assert_eq!(order, vec!["first", "a", "b", "c"]);
    }

    #[test]
    fn many_equal_deadlines_keep_fifo() {
        let mut h = TimerHeap::new();
        for i in 0..1000 {
            h.push(7.0, i);
        }
        let order: Vec<_> = std::iter::from_fn(|| h.pop().map(|(_, x)| x)).collect();
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn retain_drops_items_and_keeps_order() {
        let mut h = TimerHeap::new();
        for i in 0..10 {
            h.push(i as f64, i);
        }
        h.retain(|x| x % 2 == 0);
        assert_eq!(h.len(), 5);
        assert_eq!(h.peek().map(|(w, x)| (w, *x)), Some((0.0, 0)));
        let order: Vec<_> = std::iter::from_fn(|| h.pop().map(|(_, x)| x)).collect();
        assert_eq!(order, vec![0, 2, 4, 6, 8]);
    }

    #[test]
    fn order_key_keeps_the_order_of_floats() {
        let xs = [
            -1e300,
            -2.5,
            -0.0,
            0.0,
            1e-300,
            0.5,
            1.0,
            3600.0,
            1e300,
            f64::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{} {}", w[0], w[1]);
        }
        for x in xs {
            assert_eq!(from_order_key(order_key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn capacity_follows_a_burst_down() {
        let mut h = TimerHeap::new();
        for i in 0..100_000 {
            h.push(i as f64, i);
        }
        h.retain(|x| *x < 10);
        assert!(h.heap.capacity() < 1000);
        for i in 0..100_000 {
            h.push(i as f64, i);
        }
        while h.len() > 5 {
            h.pop();
        }
        assert!(h.heap.capacity() < 2048);
    }

    #[test]
    fn clock_is_monotonic_with_fine_resolution() {
        let a = monotonic();
        let b = monotonic();
        assert!(b >= a);
        assert!(monotonic_resolution() <= 1e-3);
    }
}
