//! Mandatory publishes in flight together: the one no queue takes is the one refused.
//!
//! lapin hands a message the broker returned to whichever confirm one broker ack completes
//! first; these tests send many at once, with one unroutable among them, many times over.

use lapin::{
    options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, ExchangeKind,
};
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    amqp::{self, publish_all_mandatory, Mandatory, Outgoing},
    CommonError,
};

use crate::helpers::AMQP_URL;

const ROUNDS: usize = 20;
const BATCH: usize = 40;

/// A direct exchange with a queue bound under `kept` and nothing under `lost`.
async fn exchange(ch: &lapin::Channel) -> String {
    exchange_and_queue(ch).await.0
}

/// [`exchange`] and the name of its queue.
async fn exchange_and_queue(ch: &lapin::Channel) -> (String, String) {
    let name = format!("t-confirms-{}", uuid::Uuid::new_v4());
    ch.exchange_declare(
        name.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let q = ch.queue_declare("".into(), own, FieldTable::default()).await.unwrap();
    ch.queue_bind(q.name().clone(), name.as_str().into(), "kept".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    (name, q.name().as_str().to_string())
}

/// Which of a round's publishes were refused as unroutable (any other error fails the test).
fn refused(results: &[Result<(), CommonError>]) -> Vec<usize> {
    let other: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).filter(|e| !matches!(e, CommonError::Unroutable { .. })).collect();
    assert!(other.is_empty(), "{other:?}");
    results.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect()
}

#[tokio::test]
async fn a_batch_of_mandatory_publishes_refuses_only_the_one_no_queue_took() {
    let conn = amqp::connect(AMQP_URL, "confirms-test").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    let exchange = exchange(&ch).await;
    for round in 0..ROUNDS {
        let lost = round * 7 % BATCH;
        let bodies: Vec<String> = (0..BATCH).map(|i| format!("round {round} message {i}")).collect();
        let batch: Vec<Outgoing> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| Outgoing {
                exchange: &exchange,
                routing_key: if i == lost { "lost" } else { "kept" },
                body: b.as_bytes(),
                props: BasicProperties::default(),
            })
            .collect();
        assert_eq!(refused(&publish_all_mandatory(&ch, &batch).await), [lost], "round {round}");
    }
    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
}

#[tokio::test]
async fn mandatory_publishes_from_many_tasks_refuse_only_the_one_no_queue_took() {
    let conn = amqp::connect(AMQP_URL, "confirms-test").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    let exchange = exchange(&ch).await;
    let copies = Mandatory::open(&conn).await.unwrap();
    for round in 0..ROUNDS {
        let lost = round * 7 % BATCH;
        let sends = (0..BATCH).map(|i| {
            let (copies, exchange) = (copies.clone(), exchange.clone());
            tokio::spawn(async move {
                let key = if i == lost { "lost" } else { "kept" };
                let body = format!("round {round} message {i}");
                copies.publish(&CancellationToken::new(), &exchange, key, body.as_bytes(), BasicProperties::default()).await
            })
        });
        let results: Vec<_> = futures::future::join_all(sends).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(refused(&results), [lost], "round {round}");
    }
    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
}

/// A copy whose turn on the channel comes after its session was lost is not published: the
/// delivery it copies goes back to its queue with the session, and the copy would be a second
/// live job.
#[tokio::test]
async fn a_copy_is_not_published_once_its_session_is_lost() {
    let conn = amqp::connect(AMQP_URL, "confirms-test").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    let (exchange, queue) = exchange_and_queue(&ch).await;
    let copies = Mandatory::open(&conn).await.unwrap();
    let lost = CancellationToken::new();
    copies.publish(&lost, &exchange, "kept", b"before", BasicProperties::default()).await.unwrap();
    lost.cancel();
    let e = copies.publish(&lost, &exchange, "kept", b"after", BasicProperties::default()).await.unwrap_err();
    assert!(matches!(e, CommonError::SessionLost { .. }), "{e}");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let depth = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.unwrap().message_count();
    assert_eq!(depth, 1, "only the copy published before the loss");
    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
}
