//! Priority tiers: one consumer per tier queue of a job type, and a dispatcher
//! that starts the highest-tier delivery it holds whenever a slot is free.
//!
//! Invariant: a slot never goes to a lower-tier job while a higher-tier delivery
//! is held. Each tier's consumer has prefetch = the type's slots, and running jobs
//! stay unacked, so a tier holds at most `slots` deliveries (running or waiting):
//! while every slot is busy, a high-tier job that arrives is held here and takes
//! the next free slot, before any normal or low one. Quorum queues have neither
//! message priorities nor a channel-wide prefetch, hence one consumer per tier.
//! A slot that a higher tier's job freed while only lower-tier deliveries are held waits
//! [`TIER_WAIT`] at most for that tier's next delivery: its consumer's prefetch was full,
//! and the broker sends the next one only once it has the ack. Without the wait, under a
//! backlog of both, each freed slot went to the lower tier, and the tiers took turns.
//!
//! The broker's consumer timeout runs from a delivery's arrival, not from its job's start:
//! a delivery held while the slots are busy is handed back as a fresh copy (see
//! [`process::release`]) once it could no longer run its whole `timeout_s` before that
//! timeout; the dispatcher looks for such deliveries every [`sweep_every`].

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{message::Delivery, options::BasicNackOptions};
use tokio::{
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use trainyard_common::{codec, job::Priority};

use super::{process, session::SessionCtx, Shared};

/// How long a slot freed by a job of a higher tier than any held waits for that tier's next delivery.
const TIER_WAIT: Duration = Duration::from_millis(100);

/// A delivery received and not started yet.
pub(crate) struct Waiting {
    pub(crate) delivery: Delivery,
    /// When it arrived: the broker's consumer timeout runs from then.
    pub(crate) arrived: Instant,
    /// Its tier.
    pub(crate) priority: Priority,
    /// Counts it in its type's waiting deliveries (the heartbeat's `waiting`) until it starts
    /// or is dropped (handed back, returned at a stop, or given up with its session).
    pub(crate) counted: Option<Counted>,
}

/// One in a shared count, for as long as it lives.
pub(crate) struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waiting {
    /// Its tier's place in [`Priority::ALL`]: 0 is the highest.
    fn tier(&self) -> usize {
        Priority::ALL.iter().position(|p| *p == self.priority).unwrap_or(0)
    }
}

/// What the dispatcher of one job type needs to start a job.
pub(crate) struct Dispatch {
    pub(crate) job_type: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sctx: SessionCtx,
    pub(crate) jobs: TaskTracker,
}

/// Runs the tier consumers (`consumers`, highest tier first) of one job type until
/// `stop` fires or the session is lost, starting a job for each of the type's `slots` free
/// (the worker's, not the session's: a job an earlier session could not stop holds one). On `stop`
/// (a shutdown) the deliveries still waiting go back to their queue at once, for other
/// workers, instead of when the connection closes after the grace period.
pub(crate) async fn run(consumers: Vec<lapin::Consumer>, ctx: Dispatch, slots: Arc<Semaphore>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut held = Held::new(consumers.len());
    let count = ctx.shared.waiting.get(&ctx.job_type).cloned().unwrap_or_default();
    for (priority, consumer) in Priority::ALL.into_iter().zip(consumers) {
        let to = Forward { tx: tx.clone(), job_type: ctx.job_type.clone(), count: count.clone() };
        tokio::spawn(forward(consumer, priority, to, ctx.sctx.clone(), stop.clone()));
    }
    drop(tx);
    dispatch(&mut rx, &mut held, &ctx, slots, &stop).await;
    take_arrived(&mut rx, &mut held);
    if stop.is_cancelled() && !ctx.sctx.lost.is_cancelled() {
        for waiting in held.take_where(|_| true) {
            let nack = waiting.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            if let Err(e) = nack {
                tracing::warn!(job_type = %ctx.job_type, error = %e, "could not return a waiting delivery; the broker takes it back with the connection");
            }
            ctx.sctx.held.release(&ctx.job_type, waiting.delivery.delivery_tag);
        }
    }
}

/// Starts held deliveries, highest tier first, as slots free up, until `stop` or a lost session.
async fn dispatch(
    rx: &mut mpsc::UnboundedReceiver<Waiting>,
    held: &mut Held<Waiting>,
    ctx: &Dispatch,
    permits: Arc<Semaphore>,
    stop: &CancellationToken,
) {
    let mut sweep = tokio::time::interval(sweep_every(ctx.shared.config.consumer_timeout));
    // Ticks missed while no slot was free or nothing was held are not made up in a burst.
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The highest tier of the jobs that ended since the last start (`usize::MAX`: none).
    let ended = Arc::new(AtomicUsize::new(usize::MAX));
    loop {
        // A stop first: a slot freed as it came would start one more job after it.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ctx.sctx.lost.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = sweep.tick() => {
                take_arrived(rx, held);
                release_stale(held, ctx);
                continue;
            }
        };
        take_arrived(rx, held);
        if held.is_empty() {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = ctx.sctx.lost.cancelled() => return,
                d = rx.recv() => d,
            };
            let Some(waiting) = next else { return };
            held.push(waiting.tier(), waiting);
            // Whatever else arrived meanwhile competes by tier.
            take_arrived(rx, held);
        }
        let freed_by = ended.swap(usize::MAX, Ordering::SeqCst);
        if held.highest_tier().is_some_and(|t| t > freed_by) {
            wait_for_tier(rx, held, freed_by, stop, &ctx.sctx.lost).await;
            if stop.is_cancelled() || ctx.sctx.lost.is_cancelled() {
                return;
            }
        }
        let Some(mut waiting) = held.pop_highest() else { continue };
        waiting.counted = None; // started: no longer waiting
        let (job_type, shared, sctx, ended, tier) =
            (ctx.job_type.clone(), ctx.shared.clone(), ctx.sctx.clone(), ended.clone(), waiting.tier());
        ctx.jobs.spawn(async move {
            process::handle(waiting, job_type, shared, sctx).await;
            ended.fetch_min(tier, Ordering::SeqCst);
            drop(permit);
        });
    }
}

/// Holds what arrives for up to [`TIER_WAIT`], until a delivery of `tier` or a higher one does.
async fn wait_for_tier(
    rx: &mut mpsc::UnboundedReceiver<Waiting>,
    held: &mut Held<Waiting>,
    tier: usize,
    stop: &CancellationToken,
    lost: &CancellationToken,
) {
    let until = Instant::now() + TIER_WAIT;
    loop {
        let next = tokio::select! {
            d = tokio::time::timeout_at(until, rx.recv()) => d,
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => return,
        };
        let Ok(Some(waiting)) = next else { return };
        let arrived = waiting.tier();
        held.push(arrived, waiting);
        if arrived <= tier {
            return;
        }
    }
}

fn take_arrived(rx: &mut mpsc::UnboundedReceiver<Waiting>, held: &mut Held<Waiting>) {
    while let Ok(waiting) = rx.try_recv() {
        held.push(waiting.tier(), waiting);
    }
}

/// How often the dispatcher looks for held deliveries that must be handed back: a twentieth
/// of the consumer timeout (between 1 s and 60 s), well inside the margin
/// [`process::fits`] keeps.
pub(crate) fn sweep_every(consumer_timeout: Duration) -> Duration {
    (consumer_timeout / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Hands back each held delivery that could no longer run its whole `timeout_s` before the
/// broker's consumer timeout. One that cannot be decoded, or whose `timeout_s` is past what
/// this worker runs at all, counts as a job of no time: it ends at once when it starts.
fn release_stale(held: &mut Held<Waiting>, ctx: &Dispatch) {
    let cfg = &ctx.shared.config;
    let longest = process::longest_timeout(cfg.consumer_timeout).as_secs();
    let stale = held.take_where(|w| {
        let ct = w.delivery.properties.content_type().as_ref().map(|s| s.as_str());
        let timeout_s = codec::decode_job(ct, &w.delivery.data, cfg.max_message_bytes).map_or(0, |spec| spec.timeout_s);
        let timeout_s = if timeout_s > longest { 0 } else { timeout_s };
        !process::fits(w.arrived.elapsed(), timeout_s, cfg.consumer_timeout)
    });
    for waiting in stale {
        let (job_type, shared, sctx) = (ctx.job_type.clone(), ctx.shared.clone(), ctx.sctx.clone());
        ctx.jobs.spawn(async move { process::release(waiting, &job_type, &shared, &sctx).await });
    }
}

/// Deliveries received and not started yet, per tier (0 = highest), each in arrival order.
struct Held<T> {
    tiers: Vec<VecDeque<T>>,
}

impl<T> Held<T> {
    fn new(tiers: usize) -> Self {
        Self { tiers: (0..tiers).map(|_| VecDeque::new()).collect() }
    }
    fn push(&mut self, tier: usize, item: T) {
        if let Some(q) = self.tiers.get_mut(tier) {
            q.push_back(item);
        }
    }
    fn is_empty(&self) -> bool {
        self.tiers.iter().all(VecDeque::is_empty)
    }
    /// The highest tier that holds an item.
    fn highest_tier(&self) -> Option<usize> {
        self.tiers.iter().position(|q| !q.is_empty())
    }
    /// The oldest item of the highest tier that holds one.
    fn pop_highest(&mut self) -> Option<T> {
        self.tiers.iter_mut().find_map(VecDeque::pop_front)
    }
    /// Takes out every item for which `stale` holds, keeping the others in order.
    fn take_where(&mut self, mut stale: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for q in &mut self.tiers {
            let (out, keep): (VecDeque<T>, VecDeque<T>) = q.drain(..).partition(&mut stale);
            taken.extend(out);
            *q = keep;
        }
        taken
    }
}

/// Forwards one tier consumer's deliveries; a consumer that fails or is closed by
/// the broker ends the session (the broker requeues what was not acked).
/// Where a tier consumer's deliveries go: the dispatcher of their type, counted as waiting.
struct Forward {
    tx: mpsc::UnboundedSender<Waiting>,
    job_type: String,
    count: Arc<AtomicUsize>,
}

async fn forward(mut consumer: lapin::Consumer, priority: Priority, to: Forward, sctx: SessionCtx, stop: CancellationToken) {
    let Forward { tx, job_type, count } = to;
    loop {
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = stop.cancelled() => return,
            _ = sctx.lost.cancelled() => return,
        };
        match next {
            Some(Ok(delivery)) => {
                // Named from now on if the broker closes the channel for an acknowledgement timeout.
                sctx.held.hold(&job_type, &delivery);
                let counted = Some(Counted::new(&count));
                if tx.send(Waiting { delivery, arrived: Instant::now(), priority, counted }).is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                if !stop.is_cancelled() {
                    super::held::consumer_failed(&job_type, &e, &sctx.held);
                    sctx.lost.cancel();
                }
                return;
            }
            None => {
                if !stop.is_cancelled() {
                    tracing::warn!(job_type = %job_type, "consumer closed by the broker");
                    sctx.lost.cancel();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Held;

    #[test]
    fn the_highest_tier_goes_first_and_each_tier_in_order() {
        let mut held = Held::new(3);
        for (tier, item) in [(2, "low-1"), (1, "normal-1"), (2, "low-2"), (0, "high-1"), (1, "normal-2"), (0, "high-2")] {
            held.push(tier, item);
        }
        let order: Vec<_> = std::iter::from_fn(|| held.pop_highest()).collect();
        assert_eq!(order, ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]);
        assert!(held.is_empty());
    }

    #[test]
    fn taking_the_stale_ones_keeps_the_others_in_order() {
        let mut held = Held::new(3);
        for (tier, item) in [(2, "low-1"), (1, "normal-1"), (2, "low-2"), (0, "high-1"), (1, "normal-2")] {
            held.push(tier, item);
        }
        let taken = held.take_where(|name| name.ends_with("-1"));
        assert_eq!(taken, ["high-1", "normal-1", "low-1"]);
        let order: Vec<_> = std::iter::from_fn(|| held.pop_highest()).collect();
        assert_eq!(order, ["normal-2", "low-2"]);
    }
}
