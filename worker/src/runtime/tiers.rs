//! Priority tiers: one consumer per tier queue of a job type, and a dispatcher
//! that starts the highest-tier delivery it holds whenever a slot is free.
//!
//! Invariant: a slot never goes to a lower-tier job while a higher-tier delivery
//! is held. Each tier's consumer has prefetch = the type's slots, and running jobs
//! stay unacked, so a tier holds at most `slots` deliveries (running or waiting):
//! while every slot is busy, a high-tier job that arrives is held here and takes
//! the next free slot, before any normal or low one. Quorum queues have neither
//! message priorities nor a channel-wide prefetch, hence one consumer per tier.

use std::{collections::VecDeque, sync::Arc};

use futures::StreamExt;
use lapin::message::Delivery;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{process, session::SessionCtx, Shared};

/// What the dispatcher of one job type needs to start a job.
pub(crate) struct Dispatch {
    pub(crate) job_type: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sctx: SessionCtx,
    pub(crate) jobs: TaskTracker,
}

/// Runs the tier consumers (`consumers`, highest tier first) of one job type until
/// `stop` fires or the session is lost, starting at most `slots` jobs at a time.
pub(crate) async fn run(consumers: Vec<lapin::Consumer>, ctx: Dispatch, slots: usize, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut held = Held::new(consumers.len());
    for (tier, consumer) in consumers.into_iter().enumerate() {
        tokio::spawn(forward(consumer, tier, tx.clone(), ctx.job_type.clone(), ctx.sctx.clone(), stop.clone()));
    }
    drop(tx);
    let permits = Arc::new(Semaphore::new(slots));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
            _ = ctx.sctx.lost.cancelled() => return,
        };
        while let Ok((tier, d)) = rx.try_recv() {
            held.push(tier, d);
        }
        if held.is_empty() {
            let next = tokio::select! {
                d = rx.recv() => d,
                _ = stop.cancelled() => return,
                _ = ctx.sctx.lost.cancelled() => return,
            };
            let Some((tier, d)) = next else { return };
            held.push(tier, d);
            // Whatever else arrived meanwhile competes by tier.
            while let Ok((tier, d)) = rx.try_recv() {
                held.push(tier, d);
            }
        }
        let Some(delivery) = held.pop_highest() else { continue };
        let (job_type, shared, sctx) = (ctx.job_type.clone(), ctx.shared.clone(), ctx.sctx.clone());
        ctx.jobs.spawn(async move {
            process::handle(delivery, job_type, shared, sctx).await;
            drop(permit);
        });
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
    /// The oldest item of the highest tier that holds one.
    fn pop_highest(&mut self) -> Option<T> {
        self.tiers.iter_mut().find_map(VecDeque::pop_front)
    }
}

/// Forwards one tier consumer's deliveries; a consumer that fails or is closed by
/// the broker ends the session (the broker requeues what was not acked).
async fn forward(
    mut consumer: lapin::Consumer,
    tier: usize,
    tx: mpsc::UnboundedSender<(usize, Delivery)>,
    job_type: String,
    sctx: SessionCtx,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = stop.cancelled() => return,
            _ = sctx.lost.cancelled() => return,
        };
        match next {
            Some(Ok(delivery)) => {
                if tx.send((tier, delivery)).is_err() {
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
}
