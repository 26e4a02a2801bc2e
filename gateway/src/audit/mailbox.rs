//! Acknowledgements delivered per front-end thread, one wake-up per group commit.
//!
//! The writer thread acknowledges an append by completing its `oneshot`. Completing it
//! from outside the runtime that runs the waiting request costs that runtime a remote
//! wake-up: on a single-threaded runtime (pingora runs one per front-end thread) every
//! one writes the runtime's eventfd, so a group commit of N appends made N system calls
//! and woke the thread up to N times.
//!
//! Here an append made on a single-threaded runtime names that runtime's [`Mailbox`]. The
//! writer posts each mailbox its share of a commit as one message, and a task on the
//! runtime completes the `oneshot`s there, where waking a task only queues it. Appends
//! made elsewhere (a multi-threaded runtime, no runtime) are acknowledged directly as
//! before. A mailbox whose runtime has gone refuses the post, and the writer then
//! delivers directly.

use std::cell::RefCell;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use super::{Appended, AuditError};

/// The result of an append.
pub(crate) type AckResult = Result<Appended, AuditError>;

/// One acknowledgement to hand out on the waiting request's runtime.
type Delivery = (oneshot::Sender<AckResult>, AckResult);

/// A single-threaded runtime's mailbox (see the module docs).
#[derive(Clone)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
    runtime: tokio::runtime::Id,
}

thread_local! {
    /// The mailbox of the runtime this thread last appended from.
    static LOCAL: RefCell<Option<Mailbox>> = const { RefCell::new(None) };
}

impl Mailbox {
    /// The mailbox of the single-threaded runtime the caller runs on, opened (and its
    /// task spawned) on first use; `None` outside such a runtime.
    pub(crate) fn current() -> Option<Mailbox> {
        let handle = Handle::try_current().ok()?;
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return None;
        }
        let runtime = handle.id();
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if let Some(m) = local.as_ref()
                && m.runtime == runtime
                && !m.tx.is_closed()
            {
                return Some(m.clone());
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Delivery>>();
            handle.spawn(async move {
                while let Some(batch) = rx.recv().await {
                    for (tx, r) in batch {
                        let _ = tx.send(r);
                    }
                }
            });
            let m = Mailbox { tx, runtime };
            *local = Some(m.clone());
            Some(m)
        })
    }
}

/// Where an append's acknowledgement goes.
pub(crate) struct Reply {
    tx: oneshot::Sender<AckResult>,
    mailbox: Option<Mailbox>,
}

impl Reply {
    /// A reply to `tx`, through the caller's runtime's mailbox where it has one. Not for
    /// a caller that polls its receiver without yielding to the runtime: the mailbox's
    /// task could not run meanwhile.
    pub(crate) fn batched(tx: oneshot::Sender<AckResult>) -> Self {
        Reply {
            tx,
            mailbox: Mailbox::current(),
        }
    }

    /// A reply to `tx`, completed by the writer itself.
    pub(crate) fn direct(tx: oneshot::Sender<AckResult>) -> Self {
        Reply { tx, mailbox: None }
    }

    /// Delivers `r` now, from this thread (errors, which are rare).
    pub(crate) fn send(self, r: AckResult) {
        let _ = self.tx.send(r);
    }
}

/// One group commit's acknowledgements, collected per mailbox and posted together.
#[derive(Default)]
pub(crate) struct Deliveries {
    boxes: Vec<(Mailbox, Vec<Delivery>)>,
}

impl Deliveries {
    /// Queues `r` for `reply`'s mailbox, or delivers it at once if it has none.
    pub(crate) fn push(&mut self, reply: Reply, r: AckResult) {
        let Some(mailbox) = reply.mailbox else {
            let _ = reply.tx.send(r);
            return;
        };
        match self
            .boxes
            .iter_mut()
            .find(|(m, _)| m.tx.same_channel(&mailbox.tx))
        {
            Some((_, batch)) => batch.push((reply.tx, r)),
            None => self.boxes.push((mailbox, vec![(reply.tx, r)])),
        }
    }

    /// Posts every mailbox its batch: one wake-up per runtime. A mailbox that is gone
    /// (its runtime shut down) gets its batch delivered directly.
    pub(crate) fn post(self) {
        for (mailbox, batch) in self.boxes {
            if let Err(mpsc::error::SendError(batch)) = mailbox.tx.send(batch) {
                for (tx, r) in batch {
                    let _ = tx.send(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(seq: u64) -> Appended {
        Appended {
            origin: "test".into(),
            seq,
            leaf_hash: [0; 32],
            covered_by_size: seq + 1,
            covered_by_root: [0; 32],
        }
    }

    #[test]
    fn replies_on_a_current_thread_runtime_go_through_its_mailbox() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx1, rx1) = oneshot::channel();
            let (tx2, rx2) = oneshot::channel();
            let (r1, r2) = (Reply::batched(tx1), Reply::batched(tx2));
            assert!(r1.mailbox.is_some() && r2.mailbox.is_some());
            // Delivered from another thread, as the writer does.
            std::thread::spawn(move || {
                let mut d = Deliveries::default();
                d.push(r1, Ok(appended(1)));
                d.push(r2, Ok(appended(2)));
                assert_eq!(d.boxes.len(), 1, "one mailbox for one runtime");
                assert_eq!(d.boxes[0].1.len(), 2);
                d.post();
            })
            .join()
            .expect("writer thread");
            assert_eq!(rx1.await.expect("ack").expect("ok").seq, 1);
            assert_eq!(rx2.await.expect("ack").expect("ok").seq, 2);
        });
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_its_own_mailbox() {
        let mk = || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
        };
        let first = mk();
        let (tx, rx) = oneshot::channel();
        let old = first.block_on(async { Reply::batched(tx) });
        drop(first);
        drop(rx);
        // The old runtime is gone: posting to its mailbox falls back to direct delivery.
        let mut d = Deliveries::default();
        d.push(old, Ok(appended(0)));
        d.post();
        let second = mk();
        second.block_on(async {
            let (tx, rx) = oneshot::channel();
            let reply = Reply::batched(tx);
            let m = reply.mailbox.as_ref().expect("mailbox");
            assert!(!m.tx.is_closed(), "a live mailbox for the new runtime");
            let mut d = Deliveries::default();
            d.push(reply, Ok(appended(7)));
            d.post();
            assert_eq!(rx.await.expect("ack").expect("ok").seq, 7);
        });
    }

    #[test]
    fn multi_threaded_runtimes_and_plain_threads_reply_directly() {
        assert!(Mailbox::current().is_none());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, rx) = oneshot::channel();
            let reply = Reply::batched(tx);
            assert!(reply.mailbox.is_none());
            let mut d = Deliveries::default();
            d.push(reply, Ok(appended(3)));
            assert!(d.boxes.is_empty());
            assert_eq!(rx.await.expect("ack").expect("ok").seq, 3);
        });
    }
}
