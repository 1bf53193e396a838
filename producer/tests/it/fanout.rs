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

/// Consumes `exchange` into `handle` in a task of its own, once its queue is bound: the token
/// that stops it and the task.
async fn consume(
    exchange: &str,
    handle: impl Fn(&lapin::message::Delivery) + Send + Sync + 'static,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let (stop, bound) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
    let task = tokio::spawn({
        let (exchange, stop, bound) = (exchange.to_string(), stop.clone(), bound.clone());
        async move {
            let link = |l: Link| bound.store(l == Link::Bound, Ordering::SeqCst);
            fanout::run_with("fanout-test", AMQP_URL, &[Bind::fanout(&exchange)], None, stop, link, handle).await
        }
    });
    for _ in 0..100 {
        if bound.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bound.load(Ordering::SeqCst), "the consumer bound its queue");
    (stop, task)
}

/// Publishes the numbers `0..n` to `exchange`, confirmed; the publisher's connection and channel.
async fn publish(exchange: &str, n: u64) -> (lapin::Connection, lapin::Channel) {
    let conn = amqp::connect(AMQP_URL, "fanout-test-publisher").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    for seq in 0..n {
        let body = seq.to_string();
        ch.basic_publish(exchange.into(), "".into(), BasicPublishOptions::default(), body.as_bytes(), BasicProperties::default())
            .await
            .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_stalled_fanout_consumer_holds_a_bounded_backlog_and_keeps_the_newest() {
    const SENT: u64 = 30_000;
    let exchange = format!("t-fanout-{}", uuid::Uuid::new_v4());
    let release = Arc::new(AtomicBool::new(false));
    let (handled, newest) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (stop, task) = consume(&exchange, {
        let (release, handled, newest) = (release.clone(), handled.clone(), newest.clone());
        move |d| {
            // The first message stalls the consumer until the whole burst is at the broker.
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            handled.fetch_add(1, Ordering::SeqCst);
            let seq: u64 = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
            newest.fetch_max(seq, Ordering::SeqCst);
        }
    })
    .await;
    let (_conn, ch) = publish(&exchange, SENT).await;
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

/// `rabbitmqctl list_* -q` rows as tab-separated fields (the header line dropped).
fn rabbitmqctl(args: &[&str]) -> Vec<Vec<String>> {
    let out = std::process::Command::new("rabbitmqctl").args(args).arg("-q").output().expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().skip(1).map(|l| l.split('\t').map(str::to_string).collect()).collect()
}

/// A quiet stream's few messages are acknowledged within a second or two, not left until
/// [`PREFETCH`]'s acks-every-128 come round: a delivery unacknowledged past the broker's
/// `consumer_timeout` closes the channel (a quiet live log, a follow of a quiet training).
#[tokio::test]
async fn a_quiet_fanout_consumer_acknowledges_what_it_handled() {
    let exchange = format!("t-fanout-quiet-{}", uuid::Uuid::new_v4());
    let handled = Arc::new(AtomicU64::new(0));
    let (stop, task) = consume(&exchange, {
        let handled = handled.clone();
        move |_| {
            handled.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let (_conn, ch) = publish(&exchange, 5).await;
    let queue = rabbitmqctl(&["list_bindings", "source_name", "destination_name"])
        .into_iter()
        .find(|row| row.first() == Some(&exchange))
        .and_then(|row| row.get(1).cloned())
        .expect("the consumer's queue is bound to the exchange");
    let unacked = || {
        let rows = rabbitmqctl(&["list_queues", "name", "messages_unacknowledged"]);
        let row = rows.into_iter().find(|row| row.first() == Some(&queue)).expect("the consumer's queue exists");
        row[1].parse::<u64>().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while handled.load(Ordering::SeqCst) < 5 || unacked() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "5 s after publishing: {} handled, {} unacknowledged",
            handled.load(Ordering::SeqCst),
            unacked()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(handled.load(Ordering::SeqCst), 5);
    stop.cancel();
    task.await.unwrap();
    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
}
