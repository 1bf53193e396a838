//! Fleeting fanout consumers hold a bounded number of messages however far behind they fall.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use lapin::{
    options::{BasicPublishOptions, ExchangeDeleteOptions},
    BasicProperties,
};
use tokio_util::sync::CancellationToken;
use trainyard::fanout::{self, Bind, Link, MAX_LENGTH, PREFETCH};
use trainyard_common::amqp;

use crate::helpers::AMQP_URL;

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_stalled_fanout_consumer_holds_a_bounded_backlog_and_keeps_the_newest() {
    const SENT: u64 = 30_000;
    let exchange = format!("t-fanout-{}", uuid::Uuid::new_v4());
    let (stop, bound, release) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (handled, newest) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let task = tokio::spawn({
        let (exchange, stop, bound, release, handled, newest) =
            (exchange.clone(), stop.clone(), bound.clone(), release.clone(), handled.clone(), newest.clone());
        async move {
            let link = |l: Link| bound.store(l == Link::Bound, Ordering::SeqCst);
            fanout::run_with("fanout-test", AMQP_URL, &[Bind::fanout(&exchange)], None, stop, link, |d| {
                // The first message stalls the consumer until the whole burst is at the broker.
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                handled.fetch_add(1, Ordering::SeqCst);
                let seq: u64 = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
                newest.fetch_max(seq, Ordering::SeqCst);
            })
            .await
        }
    });
    for _ in 0..100 {
        if bound.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bound.load(Ordering::SeqCst), "the consumer bound its queue");

    let conn = amqp::connect(AMQP_URL, "fanout-test-publisher").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    for seq in 0..SENT {
        let body = seq.to_string();
        ch.basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), body.as_bytes(), BasicProperties::default())
            .await
            .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    // Let the broker push whatever it would to a consumer that takes all.
    tokio::time::sleep(Duration::from_secs(1)).await;
    release.store(true, Ordering::SeqCst);

    let mut last = u64::MAX;
    while handled.load(Ordering::SeqCst) != last {
        last = handled.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;

    let (handled, newest) = (handled.load(Ordering::SeqCst), newest.load(Ordering::SeqCst));
    let bound = MAX_LENGTH as u64 + u64::from(PREFETCH);
    assert!(handled <= bound, "a stalled consumer was handed {handled} of {SENT} messages (at most {bound} should wait for it)");
    assert!(handled >= MAX_LENGTH as u64, "it got the backlog its queue keeps: {handled}");
    assert_eq!(newest, SENT - 1, "the newest message is kept, the oldest dropped");
}
