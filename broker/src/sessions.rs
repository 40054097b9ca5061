//! Who is connected under which client id, and what the router calls them.
//!
//! A new connection with a client id in use takes it over: the old connection is closed
//! and its Last Will published [MQTT-3.1.4-3]. The router knows a session by a key made of
//! the client id and the user ([`persistent_name`]).
//!
//! A session belongs to the identity that made it: the authenticated user, or "anonymous".
//! A client id connected by one identity cannot be taken over by another (the CONNECT is
//! refused as not authorized), and a persistent session is found again only by the identity
//! that made it: the same client id under another user is another session, so no one ever
//! resumes someone else's subscriptions or queued messages.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::router::message::Message;

/// A delayed Last Will.
struct PendingWill {
    generation: u64,
    cancel: CancellationToken,
    due_ms: u64,
    msg: Arc<Message>,
}

/// A live connection's entry.
struct Live {
    owner: Option<String>,
    generation: u64,
    kick: CancellationToken,
    done: oneshot::Receiver<()>,
}

/// What a connection holds while it owns a client id.
pub(crate) struct Claim {
    pub generation: u64,
    pub kick: CancellationToken,
    /// Dropped when the connection has finished cleaning up; a taker-over waits for it.
    pub done: oneshot::Sender<()>,
}

#[derive(Default)]
pub(crate) struct Sessions {
    live: DashMap<String, Live>,
    /// Delayed wills by session key: generation, cancel token, when due and the message.
    pending_wills: DashMap<String, PendingWill>,
    generation: std::sync::atomic::AtomicU64,
}

/// How long a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

impl Sessions {
    /// Takes `client_id` for a new connection of `owner`: kicks whoever holds it and waits
    /// (bounded) for them to clean up, and cancels a delayed Last Will of this session. Fails
    /// (with nothing changed) when another identity holds the id.
    pub async fn claim(&self, client_id: &str, owner: Option<&str>) -> Result<Claim, Foreign> {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kick = CancellationToken::new();
        let (done, done_rx) = oneshot::channel();
        let live = Live {
            owner: owner.map(str::to_owned),
            generation,
            kick: kick.clone(),
            done: done_rx,
        };
        let old = match self.live.entry(client_id.to_owned()) {
            dashmap::Entry::Occupied(e) if e.get().owner.as_deref() != owner => {
                return Err(Foreign)
            }
            dashmap::Entry::Occupied(mut e) => Some(e.insert(live)),
            dashmap::Entry::Vacant(e) => {
                e.insert(live);
                None
            }
        };
        if let Some((_, will)) = self
            .pending_wills
            .remove(&persistent_name(client_id, owner))
        {
            will.cancel.cancel();
        }
        if let Some(old) = old {
            old.kick.cancel();
            if tokio::time::timeout(TAKEOVER_WAIT, old.done).await.is_err() {
                warn!(
                    client_id,
                    "previous connection did not finish within 2s of takeover"
                );
            }
        }
        Ok(Claim {
            generation,
            kick,
            done,
        })
    }

    /// Gives up `client_id` if this connection still holds it.
    pub fn release(&self, client_id: &str, generation: u64) {
        self.live
            .remove_if(client_id, |_, l| l.generation == generation);
    }

    /// Registers a delayed Last Will `msg` of the session `session` (its
    /// [`persistent_name`]), due at `due_ms`; returns its generation and the token that
    /// cancels it.
    pub fn delay_will(
        &self,
        session: &str,
        due_ms: u64,
        msg: Arc<Message>,
    ) -> (u64, CancellationToken) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let will = PendingWill {
            generation,
            cancel: cancel.clone(),
            due_ms,
            msg,
        };
        if let Some(old) = self.pending_wills.insert(session.to_owned(), will) {
            old.cancel.cancel();
        }
        (generation, cancel)
    }

    /// Forgets a delayed will once it fired.
    pub fn will_done(&self, session: &str, generation: u64) {
        self.pending_wills
            .remove_if(session, |_, w| w.generation == generation);
    }

    /// The delayed wills waiting: session key, when due, the message (for the store's
    /// compaction).
    pub fn pending_wills(&self) -> Vec<(String, u64, Arc<Message>)> {
        self.pending_wills
            .iter()
            .map(|e| (e.key().clone(), e.due_ms, e.msg.clone()))
            .collect()
    }

    /// Number of connections holding a client id.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live.len()
    }
}

/// A client id held by another identity.
#[derive(Debug)]
pub(crate) struct Foreign;

/// The router's name for a persistent session of `owner`: the client id (and the user, if
/// any) with the characters the router refuses (`$`) and the separator escaped. Ids
/// containing `/`, `+` or `#` never get this far.
pub(crate) fn persistent_name(client_id: &str, owner: Option<&str>) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('$', "%24")
            .replace(':', "%3A")
    };
    match owner {
        None => format!("p:{}", esc(client_id)),
        Some(user) => format!("p:{}:{}", esc(client_id), esc(user)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takeover_kicks_and_waits() {
        let s = Sessions::default();
        let first = s.claim("a", None).await.expect("free");
        let kick = first.kick.clone();
        let waiter = tokio::spawn(async move {
            kick.cancelled().await;
            drop(first.done);
        });
        assert!(
            s.claim("a", Some("mallory")).await.is_err(),
            "another identity"
        );
        let second = s.claim("a", None).await.expect("same identity");
        waiter.await.expect("join");
        assert_ne!(second.generation, 0);
        s.release("a", 0);
        assert_eq!(s.len(), 1, "a stale release leaves the new owner");
        s.release("a", second.generation);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn session_keys() {
        assert_eq!(persistent_name("x$y%", None), "p:x%24y%25");
        assert_eq!(persistent_name("a:b", Some("c")), "p:a%3Ab:c");
        assert_ne!(
            persistent_name("a:b", Some("c")),
            persistent_name("a", Some("b:c"))
        );
    }
}
