//! Live re-authorization: when the policy or the trust bundle changes,
//! every established inbound connection re-checks its own peer and port
//! against the new state and closes itself if now denied.
//!
//! There is no table of connections: each connection's task holds a
//! [`Grant`] (the process-wide generation its decision was made under, the
//! root key its peer's chain ended at, whether the policy allowed it) and
//! waits on one process-wide `Notify` next to its protocol loop. Nothing runs per byte; a
//! change wakes each connection once, for one policy lookup and one
//! comparison of root keys.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use stepmesh_ca::svid::AnchorKey;

use std::time::Duration;
use tokio::sync::Notify;

use super::conn::{InboundContext, Shared};
use crate::net::idle::{IdleTicks, SharedPeriods};

/// Why a live connection was closed.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// A stable label: the policy decision's reason (`not_allowed`,
    /// `default_deny`, ...), `untrusted_root` or `revoked`.
    pub reason: &'static str,
    /// The rule that denied it (a policy field path or rule name),
    /// `trust_bundle` or `revocation_list`.
    pub rule: Arc<str>,
}

impl std::fmt::Display for Revoked {
    /// The access log's `error` of a revoked connection.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "revoked by {} ({})", self.rule, self.reason)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevokedLabels {
    reason: &'static str,
    rule: String,
}

/// The process-wide generation every live inbound connection watches, and
/// the count of connections it closed.
#[derive(Debug)]
pub struct Reauth {
    generation: AtomicU64,
    /// Woken (all waiters) after each bump of `generation`, and at each
    /// idle period's end: the inbound relay's copy, awaited beside this
    /// wait, counts `idle` instead of keeping a timer.
    changed: Notify,
    idle: IdleTicks,
    revoked: Family<RevokedLabels, Counter>,
}

impl Reauth {
    /// Registers `stepmesh_connections_revoked_total{reason,rule}`; `idle`:
    /// the idle timeout the inbound relay's copies count periods of.
    pub fn new(registry: &mut Registry, idle: Duration) -> Reauth {
        let revoked = Family::<RevokedLabels, Counter>::default();
        registry.register(
            "stepmesh_connections_revoked",
            "Established inbound connections closed because a policy or trust bundle change denied them, by reason and rule",
            revoked.clone(),
        );
        Reauth {
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            idle: IdleTicks::new(idle),
            revoked,
        }
    }

    /// The idle periods of a copy awaited beside [`Grant::revoked`] (which
    /// wakes at each period's end): the inbound relay's.
    pub fn idle_periods(&self) -> SharedPeriods<'_> {
        self.idle.periods()
    }

    /// Ends an idle period: every live connection's wait wakes, its copy
    /// counts the period, and its re-check finds the generation unchanged.
    fn tick_idle(&self) {
        self.idle.tick();
        self.changed.notify_waiters();
    }

    /// Tells every live connection to re-check itself.
    pub fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// The generation now, for [`Reauth::grant`]: read before the
    /// connection's decision, so a change right after it is re-checked.
    /// (A plain number: a receiver held there would be one more value with
    /// a destructor live across the handshake's awaits, which makes every
    /// connection's task bigger.)
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A grant for a connection whose peer was just verified, decided under
    /// `generation` (from [`Reauth::generation`]). `anchor`: the
    /// root key its chain ended at (`None` fails closed on the next
    /// change); `policy_allowed`: whether the L4 decision allowed it (an
    /// HTTP connection served while denied answers each request by policy
    /// and is not closed for it).
    /// `serial`: its leaf's `revocation::serial_key`.
    pub fn grant(
        generation: u64,
        anchor: Option<AnchorKey>,
        serial: u64,
        policy_allowed: bool,
    ) -> Grant {
        Grant {
            generation: generation as u32,
            anchor: anchor.unwrap_or(NO_ANCHOR),
            serial,
            policy_allowed,
            counted: true,
        }
    }
}

/// Follows the policy and the identity store, bumping `shared.reauth` on
/// every change; runs for the life of the process.
pub async fn follow(shared: Arc<Shared>) {
    let mut policy = shared.policy.changes();
    let mut store = shared.store.changes();
    loop {
        let changed = tokio::select! {
            r = policy.changed() => r,
            r = store.changed() => r,
        };
        // The senders live in `shared`, which this task holds.
        if changed.is_err() {
            return;
        }
        shared.reauth.bump();
        // The outbound side's pooled connections to peers now refused.
        shared.http.recheck_mesh_peers();
    }
}

/// Ends an idle period of the inbound relays' copies every idle timeout
/// ([`Reauth::idle_periods`]); runs for the life of the process. One wake
/// of every live connection per period (an hour by default) instead of a
/// timer in each.
pub async fn tick_idle_periods(shared: Arc<Shared>) {
    let period = shared.reauth.idle.period();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        shared.reauth.tick_idle();
    }
}

/// What one connection re-checks itself with: 24 bytes kept in its task,
/// no heap of its own.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The generation its decision was made under, its low 32 bits (only
    /// compared for equality: 2^32 changes while one connection's decision
    /// is made cannot happen; 4 bytes less in every connection's task).
    generation: u32,
    /// The root key its peer's chain ended at, or [`NO_ANCHOR`].
    anchor: AnchorKey,
    /// Its peer's leaf serial (`revocation::serial_key`).
    serial: u64,
    policy_allowed: bool,
    /// Whether its close is logged at info and counted: not for a mesh
    /// connection that carries tunnels only (its tunnels are the app
    /// connections, each closed and counted on its own).
    counted: bool,
}

impl Grant {
    /// The grant of an app connection within this grant's connection (a
    /// tunnel on it, or its opaque bytes decided once detected): the same
    /// peer (root key, serial), its own decision made under `generation`.
    pub fn for_stream(&self, generation: u64, policy_allowed: bool) -> Grant {
        Grant {
            generation: generation as u32,
            policy_allowed,
            counted: true,
            ..self.clone()
        }
    }

    /// This grant for a mesh connection that carries tunnels only: not
    /// closed by the policy (its tunnels are decided, and re-checked, one
    /// by one, each by its own port), closed quietly when its peer is
    /// revoked or its root removed.
    pub fn for_tunnels_only(self) -> Grant {
        Grant {
            policy_allowed: false,
            counted: false,
            ..self
        }
    }
}

/// No root key known (the bundle changed during the handshake): the next
/// change closes the connection. A real key is 0 with chance 2^-64; it
/// would only close its connections early.
const NO_ANCHOR: AnchorKey = 0;

impl Grant {
    /// Resolves once a change denies this connection, after logging and
    /// counting it; pending forever otherwise. Every inbound connection's
    /// task holds this wait: a plain `fn` around an `async move` block, so
    /// that its arguments are stored once (rust-lang/rust#62958).
    #[allow(clippy::manual_async_fn)] // on purpose: the arguments are stored once
    pub fn revoked<'a>(
        &'a self,
        shared: &'a Shared,
        ctx: &'a InboundContext,
    ) -> impl std::future::Future<Output = Revoked> + Send + 'a {
        async move {
            let mut seen = self.generation;
            loop {
                // Made before the generation is read: a bump after the read
                // wakes it (`notify_waiters` reaches every `Notified` made).
                let changed = shared.reauth.changed.notified();
                let now = shared.reauth.generation() as u32;
                if now == seen {
                    changed.await;
                    continue;
                }
                seen = now;
                if let Some(revoked) = self.check(shared, ctx) {
                    if !self.counted {
                        tracing::debug!(client = %ctx.client, peer = %ctx.peer_id, rule = %revoked.rule, "mesh connection revoked: closing");
                        return revoked;
                    }
                    tracing::info!(
                        client = %ctx.client,
                        peer = %ctx.peer_id,
                        port = ctx.port,
                        rule = %revoked.rule,
                        reason = revoked.reason,
                        "inbound connection revoked: closing"
                    );
                    shared
                        .reauth
                        .revoked
                        .get_or_create(&RevokedLabels {
                            reason: revoked.reason,
                            rule: revoked.rule.to_string(),
                        })
                        .inc();
                    return revoked;
                }
            }
        }
    }

    /// The connection against the state now: `Some` if now denied.
    pub(super) fn check(&self, shared: &Shared, ctx: &InboundContext) -> Option<Revoked> {
        if self.policy_allowed {
            let decision = shared.policy.current().authorize(&ctx.peer_id, ctx.port);
            if !decision.allow {
                return Some(Revoked {
                    reason: decision.reason,
                    rule: decision.rule,
                });
            }
        }
        if shared
            .store
            .revoked()
            .refuses_key(ctx.peer_id.as_str(), self.serial)
        {
            return Some(Revoked {
                reason: "revoked",
                rule: Arc::from("revocation_list"),
            });
        }
        let trusted = self.anchor != NO_ANCHOR
            && shared
                .store
                .bundle()
                .is_some_and(|bundle| bundle.trusts(self.anchor));
        (!trusted).then(|| Revoked {
            reason: "untrusted_root",
            rule: Arc::from("trust_bundle"),
        })
    }
}
