//! Connecting to RabbitMQ and publishing with confirms.

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use url::Url;

use crate::{codec, error::CommonError, event::JobEvent, topology::Topology};

/// Replaces the password (and user) of a URL with `***`, for logs and errors.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
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

/// Opens a connection named `name` (shown in the management UI).
pub async fn connect(url: &str, name: &str) -> Result<Connection, CommonError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await.map_err(|source| CommonError::Connect { url: redact_url(url), source })
}

/// Opens a channel with publisher confirms enabled.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, CommonError> {
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(CommonError::amqp("enable publisher confirms"))?;
    Ok(ch)
}

/// Publishes and waits for the broker's confirm. A `mandatory` message that
/// no queue takes is [`CommonError::Unroutable`]; a nack is [`CommonError::Nacked`].
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
/// `<job_type>.<status>`, and waits for the broker's confirm.
pub async fn publish_event(ch: &Channel, topology: &Topology, event: &JobEvent) -> Result<(), CommonError> {
    let body = codec::to_json(event)?;
    let props = BasicProperties::default()
        .with_content_type(codec::JSON.into())
        .with_delivery_mode(2)
        .with_message_id(format!("{}/{}", event.job_id, event.seq).into());
    publish_confirmed(ch, &topology.events_exchange(), &event.routing_key(), &body, props, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("amqp://guest:s3cret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_url("amqps://u:p@h/v"), "amqps://u:***@h/v");
        assert!(!redact_url("not a url with s3cret").contains("s3cret"));
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
    }
}
