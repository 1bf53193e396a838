//! Connecting to RabbitMQ and publishing with confirms.

use std::time::Duration;

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use url::Url;

mod mandatory;

pub use self::mandatory::{publish_all_mandatory, Mandatory, Outgoing};

use crate::{
    codec,
    error::CommonError,
    event::JobEvent,
    topology::{Topology, COALESCE_ROUTING_KEY},
    JobStatus,
};

/// Replaces the password of a URL (of each, for several separated by whitespace) with `***`, for logs and errors.
pub fn redact_url(raw: &str) -> String {
    let urls = broker_urls(raw);
    if urls.len() > 1 {
        return urls.into_iter().map(redact_url).collect::<Vec<_>>().join(" ");
    }
    match Url::parse(raw.trim()) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        // Not a URL we can parse: show only the scheme, never the rest.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".into(),
        },
    }
}

/// How long one broker address gets to accept a connection before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The broker addresses of a `TRAINYARD_AMQP_URL` value: one URL, or several separated
/// by whitespace (the nodes of one cluster), in the order given.
pub fn broker_urls(raw: &str) -> Vec<&str> {
    raw.split_whitespace().collect()
}

/// The order in which `n` addresses are tried from `start`: each once, wrapping around.
pub fn rotation(n: usize, start: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (start + i) % n)
}

/// Opens a connection named `name` (shown in the management UI) to one of the brokers
/// of `urls` (see [`broker_urls`]). With several, it starts at a random one (clients
/// spread over the nodes of a cluster) and tries each in turn until one answers, so a
/// session lost with its node reconnects to another; the error is the last address's.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, CommonError> {
    let list = broker_urls(urls);
    if list.is_empty() {
        return Err(CommonError::Config { name: "TRAINYARD_AMQP_URL".into(), reason: "no broker URL given".into() });
    }
    let start = rand::random::<u32>() as usize % list.len();
    let mut last = None;
    for i in rotation(list.len(), start) {
        match connect_one(list[i], name).await {
            Ok(conn) => return Ok(conn),
            Err(e) if list.len() > 1 => {
                tracing::warn!(broker = %redact_url(list[i]), error = %e, "broker unreachable: trying the next address");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one address was tried"))
}

async fn connect_one(url: &str, name: &str) -> Result<Connection, CommonError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let err = |source| CommonError::Connect { url: redact_url(url), source };
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(res) => res.map_err(err),
        Err(_) => Err(err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")).into())),
    }
}

/// Declares a fanout exchange for fleeting messages (heartbeats, live logs, admission
/// snapshots): not durable, idempotent.
pub async fn declare_fleeting_fanout(ch: &Channel, name: &str) -> Result<(), CommonError> {
    ch.exchange_declare(name.into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("declare exchange {name}")))
}

/// Opens a channel with publisher confirms enabled.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, CommonError> {
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(CommonError::amqp("enable publisher confirms"))?;
    Ok(ch)
}

/// Publishes and waits for the broker's confirm. A `mandatory` message that
/// no queue takes is [`CommonError::Unroutable`]; a nack is [`CommonError::Nacked`]. A
/// mandatory publish is told apart only when nothing else is in flight on `ch` (see
/// [`Mandatory`]; lapin hands a returned message to whichever confirm one ack completes first).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Result<(), CommonError> {
    let confirm = ch
        .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions { mandatory, immediate: false }, body, props)
        .await
        // The error context is formatted only on error: this runs for every job and event.
        .map_err(|e| CommonError::amqp(format!("publish to {exchange} with key {routing_key}"))(e))?
        .await
        .map_err(|e| CommonError::amqp(format!("confirm publish to {exchange} with key {routing_key}"))(e))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(CommonError::Unroutable { exchange: exchange.into(), routing_key: routing_key.into() }),
        Confirmation::Nack(_) => Err(CommonError::Nacked { exchange: exchange.into(), routing_key: routing_key.into() }),
    }
}

/// Publishes an event (JSON, persistent) to `<prefix>.events` with routing key
/// `<job_type>.<status>`, and waits for the broker's confirm. The `queued` event of a
/// job with a coalescing key is also routed with [`COALESCE_ROUTING_KEY`] (a `BCC` header,
/// which the broker removes before delivery), so only those reach the coalescing queue.
pub async fn publish_event(ch: &Channel, topology: &Topology, event: &JobEvent) -> Result<(), CommonError> {
    let body = codec::to_json(event)?;
    let mut props = BasicProperties::default()
        .with_content_type(codec::JSON.into())
        .with_delivery_mode(2)
        .with_message_id(format!("{}/{}", event.job_id, event.seq).into());
    if event.status == JobStatus::Queued && event.spec.as_ref().is_some_and(|s| s.coalesce_key.is_some()) {
        let mut headers = FieldTable::default();
        let keys = vec![AMQPValue::LongString(COALESCE_ROUTING_KEY.into())];
        headers.insert("BCC".into(), AMQPValue::FieldArray(keys.into()));
        props = props.with_headers(headers);
    }
    publish_confirmed(ch, &topology.events_exchange(), &event.routing_key(), &body, props, false).await
}

/// The properties of a message for a copy trainyard publishes of it (a worker's retry, dead
/// letter or hand-back, an admitted job, a replay): all of them but a per-message
/// `expiration` and the `user_id`. A publisher may set an expiration, and the copy would then
/// vanish unseen from a queue that has no dead-letter exchange (a dead letter from its
/// dead-letter queue before anyone replayed it); the broker drops it from the messages it
/// dead-letters itself for the same reason. A `user_id` must be the publishing connection's
/// own user: the broker closes the channel of a copy that carries another's (406), which took
/// the worker's session down at every delivery of such a job, and jammed its admission.
pub fn lasting_properties(p: &BasicProperties) -> BasicProperties {
    macro_rules! copy {
        ($out:ident, $($field:ident => $with:ident),+) => {
            $(if let Some(v) = p.$field() { $out = $out.$with(v.clone()); })+
        };
    }
    let mut out = BasicProperties::default();
    copy!(out, content_type => with_content_type, content_encoding => with_content_encoding, headers => with_headers,
        delivery_mode => with_delivery_mode, priority => with_priority, correlation_id => with_correlation_id,
        reply_to => with_reply_to, message_id => with_message_id, timestamp => with_timestamp, kind => with_type,
        app_id => with_app_id, cluster_id => with_cluster_id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_broker_urls_are_tried_each_once_from_the_start() {
        let raw = " amqp://a:5672/%2f\n\tamqp://b:5672/%2f  amqp://c:5672/%2f ";
        assert_eq!(broker_urls(raw), ["amqp://a:5672/%2f", "amqp://b:5672/%2f", "amqp://c:5672/%2f"]);
        assert_eq!(broker_urls("amqp://one"), ["amqp://one"]);
        assert!(broker_urls("  ").is_empty());
        assert_eq!(rotation(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rotation(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotation(1, 0).collect::<Vec<_>>(), [0]);
    }

    /// Whatever address it starts at, `connect` skips the dead one and reaches the broker.
    #[tokio::test]
    async fn connect_fails_over_past_a_dead_address() {
        let live = std::env::var("TRAINYARD_AMQP_URL").unwrap_or_else(|_| crate::config::DEFAULT_AMQP_URL.to_string());
        let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f {}", broker_urls(&live)[0]);
        for _ in 0..6 {
            let conn = connect(&urls, "trainyard-failover-test").await.expect("the live address is reached");
            assert!(conn.status().connected());
            let _ = conn.close(200, "test over".into()).await;
        }
        let err = connect("amqp://guest:s3cret@127.0.0.1:1/%2f amqp://guest:s3cret@127.0.0.1:2/%2f", "t").await.unwrap_err();
        assert!(matches!(err, CommonError::Connect { .. }) && !err.to_string().contains("s3cret"), "{err}");
        let err = connect(" ", "t").await.unwrap_err();
        assert!(err.to_string().contains("no broker URL"), "{err}");
    }

    /// Only the `queued` event of a job with a coalescing key reaches a queue bound with
    /// [`COALESCE_ROUTING_KEY`]; every event still reaches a `#` queue (the stream's
    /// binding) and a `*.queued` one exactly once, without the `BCC` header.
    #[tokio::test]
    async fn only_keyed_queued_events_reach_the_coalescing_key() {
        use futures::StreamExt as _;
        use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
        let url = std::env::var("TRAINYARD_AMQP_URL").unwrap_or_else(|_| crate::config::DEFAULT_AMQP_URL.to_string());
        let topo = Topology::new(format!("bcc-{}", uuid::Uuid::new_v4().simple()));
        let conn = connect(&url, "trainyard-bcc-test").await.unwrap();
        let ch = confirm_channel(&conn).await.unwrap();
        let exchange = topo.events_exchange();
        ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let mut consumers = Vec::new();
        for key in [COALESCE_ROUTING_KEY, "#", "*.queued"] {
            let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
            let q = ch.queue_declare("".into(), opts, FieldTable::default()).await.unwrap();
            ch.queue_bind(q.name().clone(), exchange.as_str().into(), key.into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .unwrap();
            let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
            consumers.push(ch.basic_consume(q.name().clone(), "".into(), no_ack, FieldTable::default()).await.unwrap());
        }
        let plain = crate::JobSpec::new("noop", "b", serde_json::json!({}), crate::Trigger::manual("t"));
        let mut keyed = crate::JobSpec::new("noop", "b", serde_json::json!({}), crate::Trigger::manual("t"));
        keyed.coalesce_key = Some(keyed.bot_coalesce_key());
        let mut started = JobEvent::queued(&keyed);
        started.status = JobStatus::Started;
        for ev in [JobEvent::queued(&plain), JobEvent::queued(&keyed), started] {
            publish_event(&ch, &topo, &ev).await.unwrap();
        }
        let mut got = Vec::new();
        for (consumer, expected) in consumers.iter_mut().zip([1, 3, 2]) {
            let mut ids = Vec::new();
            while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                assert!(d.properties.headers().as_ref().is_none_or(|h| !h.inner().contains_key("BCC")), "BCC is removed");
                let ev: JobEvent = serde_json::from_slice(&d.data).unwrap();
                ids.push((ev.job_id, ev.status));
            }
            assert_eq!(ids.len(), expected, "{ids:?}");
            got.push(ids);
        }
        assert_eq!(got[0], [(keyed.job_id.clone(), JobStatus::Queued)]);
        let _ = ch.exchange_delete(exchange.as_str().into(), Default::default()).await;
        let _ = conn.close(200, "test over".into()).await;
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("amqp://guest:s3cret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_url("amqps://u:p@h/v"), "amqps://u:***@h/v");
        assert!(!redact_url("not a url with s3cret").contains("s3cret"));
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact_url("amqp://u:p1@a/v amqp://u:p2@b/v"), "amqp://u:***@a/v amqp://u:***@b/v");
    }

    /// A copy keeps every property of the message but its `expiration` and its `user_id`.
    #[test]
    fn a_lasting_copy_keeps_every_property_but_the_expiration_and_the_user() {
        let props = |expiration: Option<&str>, user: Option<&str>| {
            let mut hdrs = FieldTable::default();
            hdrs.insert("x-trainyard-attempt".into(), AMQPValue::LongLongInt(2));
            let p = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("identity".into())
                .with_headers(hdrs)
                .with_delivery_mode(2)
                .with_priority(3)
                .with_correlation_id("c".into())
                .with_reply_to("r".into())
                .with_message_id("job-1".into())
                .with_timestamp(7)
                .with_type("noop".into())
                .with_app_id("a".into())
                .with_cluster_id("k".into());
            let p = match expiration {
                Some(e) => p.with_expiration(e.into()),
                None => p,
            };
            match user {
                Some(u) => p.with_user_id(u.into()),
                None => p,
            }
        };
        assert_eq!(lasting_properties(&props(Some("600000"), Some("ext"))), props(None, None));
    }
}
