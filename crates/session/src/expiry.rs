//! One deadline-ordered expiry task per manager (not a timer per session):
//! actors report their next deadline after every change, the task keeps
//! them ordered and pokes the actor when its deadline passes. The actor
//! re-checks, so a stale poke is harmless.

use crate::actor::Command;
use berth_core::SessionId;
use std::collections::{BTreeSet, HashMap};
use tokio::sync::mpsc;
use tokio::time::Instant;

enum Msg {
    /// Set (or move) the deadline of `id`'s activation `epoch`.
    Schedule {
        id: SessionId,
        epoch: u64,
        at: Instant,
        actor: mpsc::Sender<Command>,
    },
    /// Forget `id`'s activation `epoch` (it terminated).
    Cancel { id: SessionId, epoch: u64 },
}

#[derive(Clone)]
pub(crate) struct ExpiryHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl ExpiryHandle {
    /// Starts the task; it ends when every handle is dropped.
    pub(crate) fn spawn() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        Self { tx }
    }

    pub(crate) fn schedule(
        &self,
        id: &SessionId,
        epoch: u64,
        at: Instant,
        actor: mpsc::Sender<Command>,
    ) {
        // Fails only when the task is gone, i.e. the manager is shutting down.
        let _ = self.tx.send(Msg::Schedule {
            id: id.clone(),
            epoch,
            at,
            actor,
        });
    }

    pub(crate) fn cancel(&self, id: &SessionId, epoch: u64) {
        let _ = self.tx.send(Msg::Cancel {
            id: id.clone(),
            epoch,
        });
    }
}

struct Entry {
    at: Instant,
    epoch: u64,
    actor: mpsc::Sender<Command>,
}

#[derive(Default)]
struct Queue {
    order: BTreeSet<(Instant, SessionId)>,
    entries: HashMap<SessionId, Entry>,
}

impl Queue {
    fn apply(&mut self, msg: Msg) {
        match msg {
            Msg::Schedule {
                id,
                epoch,
                at,
                actor,
            } => {
                self.remove(&id, None);
                self.order.insert((at, id.clone()));
                self.entries.insert(id, Entry { at, epoch, actor });
            }
            Msg::Cancel { id, epoch } => self.remove(&id, Some(epoch)),
        }
    }

    fn remove(&mut self, id: &SessionId, epoch: Option<u64>) {
        let matches = self
            .entries
            .get(id)
            .is_some_and(|e| epoch.is_none_or(|ep| e.epoch == ep));
        if matches {
            if let Some(e) = self.entries.remove(id) {
                self.order.remove(&(e.at, id.clone()));
            }
        }
    }

    fn next(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Pokes every actor whose deadline is at or before `now`.
    fn fire(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.first().cloned() {
            if at > now {
                break;
            }
            self.order.pop_first();
            if let Some(e) = self.entries.remove(&id) {
                // A full queue means the actor is busy and re-reports its
                // deadline after handling its commands.
                let _ = e.actor.try_send(Command::Deadline { epoch: e.epoch });
            }
        }
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut q = Queue::default();
    loop {
        let next = q.next();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => q.apply(m),
                None => return,
            },
            _ = async { tokio::time::sleep_until(next.unwrap_or_else(Instant::now)).await },
                if next.is_some() => q.fire(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sid(n: u32) -> SessionId {
        SessionId::parse(&format!("test-session-{n:030}")).unwrap()
    }

    async fn next_deadline(rx: &mut mpsc::Receiver<Command>) -> u64 {
        match rx.recv().await {
            Some(Command::Deadline { epoch }) => epoch,
            _ => panic!("expected a deadline"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_in_deadline_order_and_honours_moves() {
        let exp = ExpiryHandle::spawn();
        let (tx, mut rx) = mpsc::channel(8);
        let t0 = Instant::now();
        exp.schedule(&sid(1), 1, t0 + Duration::from_secs(30), tx.clone());
        exp.schedule(&sid(2), 2, t0 + Duration::from_secs(10), tx.clone());
        exp.schedule(&sid(3), 3, t0 + Duration::from_secs(20), tx.clone());
        // Moving session 3 later must replace, not add, its deadline.
        exp.schedule(&sid(3), 3, t0 + Duration::from_secs(40), tx.clone());
        assert_eq!(next_deadline(&mut rx).await, 2);
        assert!(Instant::now() >= t0 + Duration::from_secs(10));
        assert_eq!(next_deadline(&mut rx).await, 1);
        assert!(Instant::now() >= t0 + Duration::from_secs(30));
        assert_eq!(next_deadline(&mut rx).await, 3);
        assert!(Instant::now() >= t0 + Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_of_an_old_epoch_keeps_the_new_one() {
        let exp = ExpiryHandle::spawn();
        let (tx, mut rx) = mpsc::channel(8);
        let t0 = Instant::now();
        exp.schedule(&sid(1), 2, t0 + Duration::from_secs(5), tx.clone());
        exp.cancel(&sid(1), 1);
        exp.schedule(&sid(2), 7, t0 + Duration::from_secs(6), tx.clone());
        exp.cancel(&sid(2), 7);
        assert_eq!(next_deadline(&mut rx).await, 2);
        let later = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
        assert!(later.is_err(), "a cancelled deadline fired");
    }
}
