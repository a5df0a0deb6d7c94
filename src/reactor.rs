//! Readiness polling (asyncio's `selectors.EpollSelector`): level-triggered epoll plus an
//! eventfd waker for `call_soon_threadsafe`.
//!
//! Level-triggered, like the selectors asyncio uses: a reader is called on every turn while
//! its fd stays readable. (mio only offers edge-triggered registration, which would need an
//! extra `epoll_ctl` per event to emulate this; see docs/design.md.)

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::io::RawFd;

/// The registrations' hash: an fd is a small int the kernel picks, not input an attacker
/// controls, so a multiply (Fibonacci hashing: it spreads the bits the table uses) replaces
/// the default SipHash, which was a few percent of a small-message echo's user time.
#[derive(Default)]
pub struct FdHasher(u64);

impl Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i32(&mut self, fd: i32) {
        self.0 = (fd as u32 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type FdMap<V> = HashMap<RawFd, V, BuildHasherDefault<FdHasher>>;

/// The epoll token of the waker; fds are non-negative so this never collides.
const WAKER_TOKEN: u64 = u64::MAX;

/// Readiness of one fd, as selectors reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub fd: RawFd,
    pub read: bool,
    pub write: bool,
}

/// What is registered for one fd: a reader and/or a writer.
pub struct Registration<T> {
    pub reader: Option<T>,
    pub writer: Option<T>,
}

pub struct Reactor<T> {
    epfd: RawFd,
    waker: RawFd,
    regs: FdMap<Registration<T>>,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn interest(reg: &Registration<impl Sized>) -> u32 {
    let mut ev = 0u32;
    if reg.reader.is_some() {
        ev |= libc::EPOLLIN as u32;
    }
    if reg.writer.is_some() {
        ev |= libc::EPOLLOUT as u32;
    }
    ev
}

fn ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads `ev`; an invalid fd is reported as an error, not UB.
    cvt(unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) }).map(|_| ())
}

/// The poll buffer lives outside the Reactor so that polling can run without the GIL
/// (and without a borrow of the loop) while other threads schedule callbacks.
pub struct EventBuf(Vec<libc::epoll_event>);

impl Default for EventBuf {
    fn default() -> Self {
        EventBuf(vec![libc::epoll_event { events: 0, u64: 0 }; 256])
    }
}

impl<T> Reactor<T> {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscalls; the fds returned are owned by this Reactor and closed in Drop.
        let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let waker = match cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }) {
            Ok(fd) => fd,
            Err(e) => {
                unsafe { libc::close(epfd) };
                return Err(e);
            }
        };
        let r = Reactor {
            epfd,
            waker,
            regs: FdMap::default(),
        };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKER_TOKEN,
        };
        // SAFETY: both fds are valid and owned by `r`.
        cvt(unsafe { libc::epoll_ctl(r.epfd, libc::EPOLL_CTL_ADD, r.waker, &mut ev) })?;
        Ok(r)
    }

    pub fn epfd(&self) -> RawFd {
        self.epfd
    }

    pub fn waker_fd(&self) -> RawFd {
        self.waker
    }

    pub fn is_closed(&self) -> bool {
        self.epfd < 0
    }

    pub fn get(&self, fd: RawFd) -> Option<&Registration<T>> {
        self.regs.get(&fd)
    }

    /// True when any fd (besides the waker) is registered.
    pub fn has_registrations(&self) -> bool {
        !self.regs.is_empty()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
        ctl(self.epfd, op, fd, events)
    }

    /// Set the reader (`write == false`) or writer of `fd`, returning the one it replaces.
    pub fn set(&mut self, fd: RawFd, write: bool, item: T) -> io::Result<Option<T>> {
        let epfd = self.epfd;
        let Some(reg) = self.regs.get_mut(&fd) else {
            let reg = if write {
                Registration {
                    reader: None,
                    writer: Some(item),
                }
            } else {
                Registration {
                    reader: Some(item),
                    writer: None,
                }
            };
            ctl(epfd, libc::EPOLL_CTL_ADD, fd, interest(&reg))?;
            self.regs.insert(fd, reg);
            return Ok(None);
        };
        let slot = if write {
            &mut reg.writer
        } else {
            &mut reg.reader
        };
        let old = slot.replace(item);
        let events = interest(reg);
        let res = match ctl(epfd, libc::EPOLL_CTL_MOD, fd, events) {
            // The fd was closed and its number reused: epoll forgot it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(epfd, libc::EPOLL_CTL_ADD, fd, events)
            }
            other => other,
        };
        match res {
            Ok(()) => Ok(old),
            Err(e) => {
                // Leave the registration as it was.
                let slot = if write {
                    &mut reg.writer
                } else {
                    &mut reg.reader
                };
                *slot = old;
                Err(e)
            }
        }
    }

    /// Remove the reader or writer of `fd`; returns it if there was one.
    pub fn unset(&mut self, fd: RawFd, write: bool) -> Option<T> {
        let reg = self.regs.get_mut(&fd)?;
        let old = if write {
            reg.writer.take()
        } else {
            reg.reader.take()
        };
        old.as_ref()?;
        let events = interest(reg);
        if events == 0 {
            self.regs.remove(&fd);
            // Errors mean the fd is already closed (so epoll forgot it): nothing to undo.
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0);
        } else {
            let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, events);
        }
        old
    }

    /// Wait for readiness. `timeout_ms < 0` waits forever. Returns the ready fds; the waker
    /// is drained and not reported.
    pub fn poll(
        epfd: RawFd,
        waker: RawFd,
        buf: &mut EventBuf,
        timeout_ms: i32,
        out: &mut Vec<Ready>,
    ) -> io::Result<()> {
        // SAFETY: the buffer is valid for buf.0.len() events and outlives the call.
        let n = cvt(unsafe {
            libc::epoll_wait(
                epfd,
                buf.0.as_mut_ptr(),
                buf.0.len() as libc::c_int,
                timeout_ms,
            )
        })? as usize;
        for ev in &buf.0[..n] {
            if ev.u64 == WAKER_TOKEN {
                let mut val: u64 = 0;
                // SAFETY: reading 8 bytes from our own non-blocking eventfd into a u64.
                unsafe { libc::read(waker, &mut val as *mut u64 as *mut libc::c_void, 8) };
                continue;
            }
            let e = ev.events;
            // selectors: any event but EPOLLIN means writable, any but EPOLLOUT readable
            // (so errors and hang-ups wake both sides).
            out.push(Ready {
                fd: ev.u64 as RawFd,
                read: e & !(libc::EPOLLOUT as u32) != 0,
                write: e & !(libc::EPOLLIN as u32) != 0,
            });
        }
        if n == buf.0.len() && n < 65536 {
            // A full buffer: grow it so a busy turn sees every fd.
            buf.0.resize(n * 2, libc::epoll_event { events: 0, u64: 0 });
        }
        Ok(())
    }

    /// Wake a poll in progress (safe from any thread: a write to the eventfd).
    pub fn wake(waker: RawFd) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd; EAGAIN (counter full) still leaves it readable.
        unsafe { libc::write(waker, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Every registration (the cycle collector's walk of the loop).
    pub fn registrations(&self) -> impl Iterator<Item = &Registration<T>> {
        self.regs.values()
    }

    /// Forget every registration, leaving the fds open and epoll unchanged (the loop is
    /// being freed by the cycle collector; Drop closes the fds).
    pub fn forget(&mut self) -> Vec<Registration<T>> {
        self.regs.drain().map(|(_, r)| r).collect()
    }

    /// Forget every registration and close the fds (the loop's close()).
    pub fn close(&mut self) -> Vec<Registration<T>> {
        let regs = self.regs.drain().map(|(_, r)| r).collect();
        if self.epfd >= 0 {
            // SAFETY: we own both fds and mark them closed so they are closed once.
            unsafe {
                libc::close(self.epfd);
                libc::close(self.waker);
            }
            self.epfd = -1;
            self.waker = -1;
        }
        regs
    }
}

impl<T> Drop for Reactor<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        (fds[0], fds[1])
    }

    #[test]
    fn level_triggered_reader_fires_until_drained() {
        let mut r: Reactor<&str> = Reactor::new().unwrap();
        let (rd, wr) = pipe();
        r.set(rd, false, "reader").unwrap();
        unsafe { libc::write(wr, b"x".as_ptr() as *const libc::c_void, 1) };
        let mut buf = EventBuf::default();
        for _ in 0..3 {
            let mut out = vec![];
            Reactor::<&str>::poll(r.epfd(), r.waker_fd(), &mut buf, 0, &mut out).unwrap();
            assert_eq!(
                out,
                vec![Ready {
                    fd: rd,
                    read: true,
                    write: false
                }]
            );
        }
        let mut b = [0u8; 1];
        unsafe { libc::read(rd, b.as_mut_ptr() as *mut libc::c_void, 1) };
        let mut out = vec![];
        Reactor::<&str>::poll(r.epfd(), r.waker_fd(), &mut buf, 0, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(r.unset(rd, false), Some("reader"));
        assert_eq!(r.unset(rd, false), None);
        assert!(!r.has_registrations());
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    #[test]
    fn waker_interrupts_poll_and_is_not_reported() {
        let r: Reactor<()> = Reactor::new().unwrap();
        Reactor::<()>::wake(r.waker_fd());
        let mut buf = EventBuf::default();
        let mut out = vec![];
        Reactor::<()>::poll(r.epfd(), r.waker_fd(), &mut buf, 1000, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn closed_fd_is_an_os_error() {
        let mut r: Reactor<()> = Reactor::new().unwrap();
        let err = r.set(987654, false, ()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(!r.has_registrations());
    }
}
