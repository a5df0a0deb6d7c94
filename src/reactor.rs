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

/// Sides of a registration, as bits.
const READ: u8 = 1;
const WRITE: u8 = 2;

const IN: u32 = libc::EPOLLIN as u32;
const OUT: u32 = libc::EPOLLOUT as u32;
const ONESHOT: u32 = libc::EPOLLONESHOT as u32;

fn side(write: bool) -> u8 {
    if write {
        WRITE
    } else {
        READ
    }
}

/// What is registered for one fd: a reader and/or a writer, and what the kernel holds.
///
/// A side registered as a one-shot waiter (`Reactor::set(.., oneshot = true)`, the `sock_*`
/// slow path) is called once per arming: when every waiting side is one-shot the fd is
/// registered with EPOLLONESHOT, so the kernel disarms it on its event and no `epoll_ctl`
/// is needed to stop it; the next wait re-arms it with one EPOLL_CTL_MOD. A reader or writer
/// that must stay level-triggered (`add_reader`, transports) keeps the fd level-triggered.
pub struct Registration<T> {
    pub reader: Option<T>,
    pub writer: Option<T>,
    /// The sides (READ/WRITE bits) whose waiter is one-shot.
    oneshot: u8,
    /// One-shot sides that had their event and were not re-armed: left out of the interest.
    spent: u8,
    /// The events armed in epoll (with EPOLLONESHOT when one-shot); 0 when none are.
    armed: u32,
    /// An epoll entry exists for the fd (armed, or disarmed by its one-shot event).
    in_epoll: bool,
}

impl<T> Registration<T> {
    fn new(write: bool, item: T, oneshot: bool) -> Self {
        let (reader, writer) = if write {
            (None, Some(item))
        } else {
            (Some(item), None)
        };
        Registration {
            reader,
            writer,
            oneshot: if oneshot { side(write) } else { 0 },
            spent: 0,
            armed: 0,
            in_epoll: false,
        }
    }

    fn sides(&self) -> u8 {
        u8::from(self.reader.is_some()) | (u8::from(self.writer.is_some()) << 1)
    }

    fn slot(&mut self, write: bool) -> &mut Option<T> {
        if write {
            &mut self.writer
        } else {
            &mut self.reader
        }
    }

    /// The epoll events this registration needs armed now.
    fn wanted(&self) -> u32 {
        let live = self.sides() & !self.spent;
        let mut ev = 0;
        if live & READ != 0 {
            ev |= IN;
        }
        if live & WRITE != 0 {
            ev |= OUT;
        }
        if live != 0 && live & !self.oneshot == 0 {
            ev |= ONESHOT;
        }
        ev
    }
}

pub struct Reactor<T> {
    epfd: RawFd,
    waker: RawFd,
    /// The registrations, and the parked fds: entries with no reader or writer whose epoll
    /// entry was left in place, disarmed by its one-shot event (so it can never report
    /// anything). The next registration of a parked fd re-arms its entry with
    /// EPOLL_CTL_MOD instead of an ADD after a DEL. The fd may have been closed since (the
    /// kernel then dropped the entry, or keeps it disarmed while a dup lives) and its number
    /// reused: MOD then fails with ENOENT and the registration falls back to ADD.
    regs: FdMap<Registration<T>>,
    /// How many entries of `regs` have a reader or writer (are not parked).
    live: usize,
    /// Fds whose one-shot registration fired while another side still waits: re-armed
    /// before the next poll (EPOLLONESHOT disarms every side of the fd at once).
    fired: Vec<RawFd>,
    /// Sleeping polls left that skip the look for ready events with the GIL held
    /// (`peek_first`).
    peek_skip: u32,
}

/// After a peek that found nothing, this many sleeping polls go straight to sleep: an idle
/// loop pays the extra syscall on one sleep in this many.
const PEEK_BACKOFF: u32 = 16;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads `ev`; an invalid fd is reported as an error, not UB.
    cvt(unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) }).map(|_| ())
}

/// Bring the kernel's entry for `fd` to what `reg` wants, with at most one `epoll_ctl`
/// (two when a MOD finds the fd forgotten). On error `reg`'s kernel state is unchanged.
fn sync<T>(epfd: RawFd, fd: RawFd, reg: &mut Registration<T>) -> io::Result<()> {
    let want = reg.wanted();
    if want == reg.armed {
        return Ok(());
    }
    if want == 0 {
        // Only a delete disarms for sure: an entry modified to no events still reports
        // errors and hang-ups. An error means the fd is closed: nothing left to disarm.
        let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0);
        reg.in_epoll = false;
        reg.armed = 0;
        return Ok(());
    }
    if reg.in_epoll {
        match ctl(epfd, libc::EPOLL_CTL_MOD, fd, want) {
            // The fd was closed (and its number perhaps reused): epoll forgot it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(epfd, libc::EPOLL_CTL_ADD, fd, want)?
            }
            other => other?,
        }
    } else {
        ctl(epfd, libc::EPOLL_CTL_ADD, fd, want)?;
    }
    reg.in_epoll = true;
    reg.armed = want;
    Ok(())
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
            live: 0,
            fired: Vec::new(),
            peek_skip: 0,
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
        self.regs.get(&fd).filter(|reg| reg.sides() != 0)
    }

    /// True when any fd (besides the waker) is registered.
    pub fn has_registrations(&self) -> bool {
        self.live != 0
    }

    /// Set the reader (`write == false`) or writer of `fd`, returning the one it replaces.
    /// A `oneshot` one is called once, then waits for `rearm` (see `Registration`).
    pub fn set(&mut self, fd: RawFd, write: bool, item: T, oneshot: bool) -> io::Result<Option<T>> {
        let epfd = self.epfd;
        let Some(reg) = self.regs.get_mut(&fd) else {
            let mut reg = Registration::new(write, item, oneshot);
            sync(epfd, fd, &mut reg)?;
            self.regs.insert(fd, reg);
            self.live += 1;
            return Ok(None);
        };
        let parked = reg.sides() == 0;
        let bit = side(write);
        let (oneshot_was, spent_was) = (reg.oneshot, reg.spent);
        let old = reg.slot(write).replace(item);
        reg.spent &= !bit;
        if oneshot {
            reg.oneshot |= bit;
        } else {
            reg.oneshot &= !bit;
        }
        match sync(epfd, fd, reg) {
            Ok(()) => {
                if parked {
                    self.live += 1;
                }
                Ok(old)
            }
            Err(e) => {
                // Leave the registration as it was.
                *reg.slot(write) = old;
                reg.oneshot = oneshot_was;
                reg.spent = spent_was;
                Err(e)
            }
        }
    }

    /// Remove the reader or writer of `fd`; returns it if there was one.
    pub fn unset(&mut self, fd: RawFd, write: bool) -> Option<T> {
        let reg = self.regs.get_mut(&fd)?;
        let old = reg.slot(write).take();
        old.as_ref()?;
        let bit = side(write);
        reg.oneshot &= !bit;
        reg.spent &= !bit;
        if reg.sides() == 0 {
            self.live -= 1;
            if reg.in_epoll && reg.armed == 0 {
                // Disarmed by its one-shot event: it can report nothing, keep it parked.
                reg.oneshot = 0;
                reg.spent = 0;
            } else {
                if reg.in_epoll {
                    // Errors mean the fd is already closed (so epoll forgot it).
                    let _ = ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, 0);
                }
                self.regs.remove(&fd);
            }
        } else {
            // An error means the fd is closed: its entry is gone, like its events.
            let _ = sync(self.epfd, fd, reg);
        }
        old
    }

    /// The reader and writer to call for a polled event. A one-shot registration was
    /// disarmed by the kernel on this event: its waiters called now are spent, and a side
    /// still waiting is re-armed by `rearm_fired` before the next poll.
    pub fn fire(&mut self, ev: Ready) -> (Option<&T>, Option<&T>) {
        let Some(reg) = self.regs.get_mut(&ev.fd) else {
            return (None, None);
        };
        let live = reg.sides() & !reg.spent;
        let call = (if ev.read { READ } else { 0 } | if ev.write { WRITE } else { 0 }) & live;
        if reg.armed & ONESHOT != 0 {
            reg.armed = 0;
            reg.spent |= call;
            if reg.wanted() != 0 {
                self.fired.push(ev.fd);
            }
        }
        let reader = if call & READ != 0 {
            reg.reader.as_ref()
        } else {
            None
        };
        let writer = if call & WRITE != 0 {
            reg.writer.as_ref()
        } else {
            None
        };
        (reader, writer)
    }

    /// Re-arm the one-shot registrations that fired with a side still waiting (see `fire`).
    pub fn rearm_fired(&mut self) {
        if self.fired.is_empty() {
            return;
        }
        let mut fired = std::mem::take(&mut self.fired);
        for fd in fired.drain(..) {
            if let Some(reg) = self.regs.get_mut(&fd) {
                // An error means the fd is closed: it could report nothing anyway.
                let _ = sync(self.epfd, fd, reg);
            }
        }
        self.fired = fired;
    }

    /// A one-shot waiter that was called but is not done (the socket was not ready after
    /// all, or a send was partial) waits for one more event, as a level-triggered one would.
    pub fn rearm(&mut self, fd: RawFd, write: bool) {
        let bit = side(write);
        if let Some(reg) = self.regs.get_mut(&fd) {
            if reg.spent & bit != 0 {
                reg.spent &= !bit;
                let _ = sync(self.epfd, fd, reg);
            }
        }
    }

    /// Whether a poll that may sleep should first look for ready events without sleeping
    /// (with the GIL held: when there are some, the GIL is not released and retaken).
    pub fn peek_first(&mut self) -> bool {
        if self.peek_skip == 0 {
            return true;
        }
        self.peek_skip -= 1;
        false
    }

    /// What the look of `peek_first` found: nothing backs off for a while.
    pub fn peeked(&mut self, found: bool) {
        if !found {
            self.peek_skip = PEEK_BACKOFF;
        }
    }

    /// Wait for readiness. `timeout_ms < 0` waits forever. Returns the ready fds; the waker
    /// is drained and not reported. The result is the number of epoll events (the waker's
    /// included): 0 when the wait timed out.
    pub fn poll(
        epfd: RawFd,
        waker: RawFd,
        buf: &mut EventBuf,
        timeout_ms: i32,
        out: &mut Vec<Ready>,
    ) -> io::Result<usize> {
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
        Ok(n)
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
        self.live = 0;
        self.fired.clear();
        self.regs.drain().map(|(_, r)| r).collect()
    }

    /// Forget every registration and close the fds (the loop's close()).
    pub fn close(&mut self) -> Vec<Registration<T>> {
        let regs = self.forget();
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
        r.set(rd, false, "reader", false).unwrap();
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

    fn poll_now(r: &Reactor<&str>) -> Vec<Ready> {
        let mut buf = EventBuf::default();
        let mut out = vec![];
        Reactor::<&str>::poll(r.epfd(), r.waker_fd(), &mut buf, 0, &mut out).unwrap();
        out
    }

    fn write1(fd: RawFd) {
        unsafe { libc::write(fd, b"x".as_ptr() as *const libc::c_void, 1) };
    }

    /// Whether epoll holds an entry for `fd` (an ADD then fails with EEXIST).
    fn in_epoll(r: &Reactor<&str>, fd: RawFd) -> bool {
        match ctl(r.epfd(), libc::EPOLL_CTL_ADD, fd, 0) {
            Ok(()) => {
                ctl(r.epfd(), libc::EPOLL_CTL_DEL, fd, 0).unwrap();
                false
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
                true
            }
        }
    }

    #[test]
    fn oneshot_waiter_fires_once_and_is_parked_disarmed() {
        let mut r: Reactor<&str> = Reactor::new().unwrap();
        let (rd, wr) = pipe();
        r.set(rd, false, "waiter", true).unwrap();
        write1(wr);
        let out = poll_now(&r);
        assert_eq!(out.len(), 1);
        assert_eq!(r.fire(out[0]), (Some(&"waiter"), None));
        // Still readable, but disarmed: no second event, nothing to re-arm.
        r.rearm_fired();
        assert!(poll_now(&r).is_empty());
        // Removing it leaves the entry in epoll, disarmed.
        assert_eq!(r.unset(rd, false), Some("waiter"));
        assert!(!r.has_registrations());
        assert!(r.get(rd).is_none());
        assert_eq!(r.unset(rd, false), None);
        assert!(in_epoll(&r, rd));
        assert!(poll_now(&r).is_empty());
        // The next registration re-arms it (level-triggered now: every poll reports it).
        r.set(rd, false, "reader", false).unwrap();
        for _ in 0..2 {
            let out = poll_now(&r);
            assert_eq!(out.len(), 1);
            assert_eq!(r.fire(out[0]), (Some(&"reader"), None));
        }
        assert_eq!(r.unset(rd, false), Some("reader"));
        assert!(!in_epoll(&r, rd));
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    #[test]
    fn oneshot_waiter_rearmed_when_called_too_early() {
        let mut r: Reactor<&str> = Reactor::new().unwrap();
        let (rd, wr) = pipe();
        r.set(rd, false, "waiter", true).unwrap();
        write1(wr);
        let out = poll_now(&r);
        assert_eq!(r.fire(out[0]), (Some(&"waiter"), None));
        r.rearm(rd, false);
        let out = poll_now(&r);
        assert_eq!(out.len(), 1);
        assert_eq!(r.fire(out[0]), (Some(&"waiter"), None));
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    #[test]
    fn level_side_keeps_a_shared_fd_level_triggered() {
        let mut r: Reactor<&str> = Reactor::new().unwrap();
        let mut fds = [0; 2];
        assert_eq!(
            unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
                    0,
                    fds.as_mut_ptr(),
                )
            },
            0
        );
        let (a, b) = (fds[0], fds[1]);
        r.set(a, true, "writer", false).unwrap();
        r.set(a, false, "waiter", true).unwrap();
        write1(b);
        for _ in 0..3 {
            let out = poll_now(&r);
            assert_eq!(out.len(), 1);
            assert_eq!(r.fire(out[0]), (Some(&"waiter"), Some(&"writer")));
            r.rearm_fired();
        }
        // Two one-shot sides: an event for one re-arms the other before the next poll.
        r.set(a, true, "writer2", true).unwrap();
        let out = poll_now(&r);
        assert_eq!(r.fire(out[0]), (Some(&"waiter"), Some(&"writer2")));
        r.unset(a, false);
        r.rearm(a, true);
        let out = poll_now(&r);
        assert_eq!(r.fire(out[0]), (None, Some(&"writer2")));
        unsafe {
            libc::close(a);
            libc::close(b);
        }
    }

    #[test]
    fn parked_fd_closed_and_number_reused() {
        let mut r: Reactor<&str> = Reactor::new().unwrap();
        let (rd, wr) = pipe();
        r.set(rd, false, "waiter", true).unwrap();
        write1(wr);
        let out = poll_now(&r);
        r.fire(out[0]);
        r.unset(rd, false);
        // Closed while a dup lives, then the number names another pipe.
        let dup = unsafe { libc::dup(rd) };
        let (rd2, wr2) = pipe();
        assert_eq!(unsafe { libc::dup2(rd2, rd) }, rd);
        unsafe { libc::close(rd2) };
        r.set(rd, false, "new", false).unwrap();
        // The old pipe (readable through `dup`) reports nothing; the new one does.
        assert!(poll_now(&r).is_empty());
        write1(wr2);
        let out = poll_now(&r);
        assert_eq!(out.len(), 1);
        assert_eq!(r.fire(out[0]), (Some(&"new"), None));
        unsafe {
            for fd in [rd, wr, wr2, dup] {
                libc::close(fd);
            }
        }
    }

    #[test]
    fn closed_fd_is_an_os_error() {
        let mut r: Reactor<()> = Reactor::new().unwrap();
        let err = r.set(987654, false, (), false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(!r.has_registrations());
    }
}
